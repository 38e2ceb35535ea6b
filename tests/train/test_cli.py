"""`k2jax train` options: YAML config with flag overrides, validation with one-line errors,
resume keeping the run's options, optimizer masks (decay and Muon) by parameter path."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import cli
from train import cli as train_cli
from train import optimizer, qat
from train.config import PARAM_GROUPS, TrainConfig, TrainConfigError


def _args(*argv):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_help_shows_a_runnable_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "k2jax train --preset tiny" in text and "--resume" in text and "--qat" in text


def test_yaml_config_with_flag_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("data: corpus.jsonl\nout: run\noptimizer: muon\nsteps: 7\n"
                    "qat_groups: [routed_experts]\ntrainable: routed_experts,router\n")
    cfg = train_cli.build_config(_args("--config", str(path), "--steps", "9", "--qat", "none"))
    assert (cfg.optimizer, cfg.steps, cfg.qat_groups) == ("muon", 9, ())
    assert cfg.trainable == ("routed_experts", "router") and cfg.preset == "tiny"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with_checkpoint = TrainConfig.from_dict({"data": "d", "out": "o", "checkpoint": "ckpt"})
    assert with_checkpoint.preset is None


@pytest.mark.parametrize("argv, message", [
    (("--data", "d", "--out", "o", "--batch-size", "6", "--grad-accum", "4"), "divisible"),
    (("--data", "d", "--out", "o", "--qat", "experts"), "qat_groups"),
    (("--data", "d", "--out", "o", "--trainable", "routed_experts", "--qk-clip-threshold",
      "100"), "attention"),
    (("--data", "d", "--out", "o", "--remat-policy", "everything"), "remat_policy"),
    (("--out", "o",), "data"),
])
def test_invalid_options_are_one_line_errors(argv, message, capsys):
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("k2jax train: error:") and message in err and len(err.splitlines()) == 1


def test_missing_corpus_or_existing_export_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "none.jsonl"), "--out",
                     str(tmp_path / "run"), "--mesh", f"fsdp={jax.device_count()}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["train", "--data", "d", "--out", str(tmp_path / "run"), "--export",
                     str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_resume_keeps_the_run_options(tmp_path):
    run = tmp_path / "run"
    TrainConfig(data="d", out=str(run), steps=5, learning_rate=1e-3).save(run)
    cfg = train_cli.build_config(_args("--resume", "--out", str(run), "--steps", "8",
                                       "--learning-rate", "1e-3"))
    assert (cfg.steps, cfg.learning_rate, cfg.data) == (8, 1e-3, "d")
    with pytest.raises(TrainConfigError, match="learning_rate"):
        train_cli.build_config(_args("--resume", "--out", str(run), "--learning-rate", "1"))
    with pytest.raises(TrainConfigError, match="nothing to resume"):
        train_cli.build_config(_args("--resume", "--out", str(tmp_path / "other")))


def test_optimizer_masks_follow_parameter_paths():
    """Weight decay reaches kernels and the embedding, never norm scales; Muon takes the
    linear kernels (lm_head excepted) and AdamW the rest."""
    params = {"embed_tokens": {"embedding": jnp.ones((8, 4))},
              "lm_head": {"kernel": jnp.ones((4, 8))},
              "norm": {"scale": jnp.ones((4,))},
              "moe_layers": {"mlp": {"experts": {"up_proj": {"kernel": jnp.ones((2, 3, 4, 4))}}}}}
    zero = jax.tree.map(jnp.zeros_like, params)
    for name in ("adamw", "muon"):
        cfg = TrainConfig(data="d", out="o", optimizer=name, learning_rate=0.1, warmup_steps=0,
                          weight_decay=0.5, grad_clip=None)
        tx = optimizer.make_optimizer(cfg)
        updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
        moved = {p: bool(np.any(np.asarray(u))) for p, u in qat.flat(updates).items()}
        assert moved == {("embed_tokens", "embedding"): True, ("lm_head", "kernel"): True,
                         ("norm", "scale"): False,
                         ("moe_layers", "mlp", "experts", "up_proj", "kernel"): True}, name
    assert optimizer._uses_muon(("moe_layers", "mlp", "experts", "up_proj", "kernel"))
    assert not optimizer._uses_muon(("lm_head", "kernel"))
    assert set(PARAM_GROUPS) >= {qat.path_group(p) for p in qat.flat(params)}

"""`k2jax train` options: --help shows every default, YAML config with flag overrides,
validation with one-line errors, a bad corpus line reported before anything is compiled or
written, resume keeping the run's options, schedule and finished export, optimizer masks (decay
and Muon) by parameter path."""

import argparse
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli
from train import cli as train_cli
from train import optimizer, qat, trainer
from train.config import PARAM_GROUPS, TrainConfig, TrainConfigError


def _args(*argv):
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _help_by_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    options = text.split("options:\n", 1)[1].split("\n\n", 1)[0]
    blocks = [" ".join(b.split()) for b in re.split(r"\n(?=  -)", options)]
    return text, {b.split()[0].rstrip(","): b for b in blocks}


def test_help_shows_every_default_and_a_runnable_example(capsys, monkeypatch):
    text, options = _help_by_option(capsys, monkeypatch)
    assert "k2jax train --preset tiny" in text and "--resume" in text and "--qat" in text
    assert {"--steps", "--decay-steps", "--export", "--resume", "--config"} <= set(options)
    shown = {name for name, block in options.items() if "(default: " in block}
    assert shown == set(options) - {"-h", "--data", "--out"}, set(options) - shown
    assert "(required)" in options["--data"] and "(required)" in options["--out"]
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if flag in options and isinstance(field.default, (int, float, str)):
            assert f"(default: {field.default}" in options[flag], options[flag]
    assert "(default: 100)" in options["--steps"] and "first run" in options["--decay-steps"]


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


@pytest.mark.parametrize("line, message", [
    ('{"text": "no closing quote}', "not valid JSON: Unterminated string"),
    ('["text", "a list"]', "expected a JSON object"),
    ('{"prompt": "?"}', "a record needs 'text', 'messages' or 'input_ids'"),
    ('{"text": 7}', "'text' must be a string"),
    ('{"input_ids": [1, 100000]}', "input_ids outside [0, 512)"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
])
def test_a_bad_corpus_line_is_reported_before_compiling_or_writing(line, message, tmp_path,
                                                                   capsys, monkeypatch):
    """The bad line comes late (a full pass, not a sample); the run directory never appears."""
    def no_compile(*args, **kwargs):
        raise AssertionError("the step was built before the corpus was checked")

    monkeypatch.setattr(trainer.step_lib, "jit_step", no_compile)
    good = json.dumps({"text": "the quick brown fox"}) + "\n"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(good * 299 + "\n" + line + "\n" + good * 200)
    run = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--data", str(corpus), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"k2jax train: error: {corpus}:301: ") and message in err, err
    assert len(err.splitlines()) == 1 and not run.exists()


def test_a_corpus_without_a_training_pair_fails_before_compiling(tmp_path, capsys):
    corpus = tmp_path / "short.jsonl"
    corpus.write_text('{"input_ids": [5]}\n' * 3)
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "run")]) == 2
    assert "no document has two tokens" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


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


def test_resume_keeps_the_schedule_and_never_rewrites_a_finished_export(tmp_path, capsys):
    run, first_export = tmp_path / "run", tmp_path / "int4"
    TrainConfig(data="d", out=str(run), steps=50, warmup_steps=5,
                export=str(first_export)).save(run)
    resume = ("--resume", "--out", str(run), "--steps", "100")
    # The first run stopped before its export: the resumed run writes it.
    cfg = train_cli.build_config(_args(*resume))
    assert (cfg.steps, cfg.decay_steps, cfg.export) == (100, 50, str(first_export))
    first = optimizer.schedule(TrainConfig.load_run(run))
    longer = optimizer.schedule(cfg)
    np.testing.assert_array_equal([first(s) for s in range(101)],
                                  [longer(s) for s in range(101)])
    # Once it exists, a resume without --export says so in one line and exports nothing.
    first_export.mkdir()
    assert train_cli.build_config(_args(*resume)).export is None
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"not exporting: {first_export}" in err
    # --export on the resume line is used; an existing path given there is an error.
    assert train_cli.build_config(_args(*resume, "--export", "new")).export == "new"
    assert cli.main(["train", *resume, "--export", str(first_export)]) == 2
    assert "already exists" in capsys.readouterr().err
    for option in (("--decay-steps", "100"), ("--seq-len", "256")):
        assert cli.main(["train", *resume, *option]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and option[0][2:].replace("-", "_") in err
    more = train_cli.build_config(_args(*resume, "--checkpoint-every", "7", "--log-every", "2"))
    assert (more.checkpoint_every, more.log_every) == (7, 2)


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

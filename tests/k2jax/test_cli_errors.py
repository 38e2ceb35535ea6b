"""User errors print one line and exit 2; meshes that cannot split the model are refused."""

import json
import os
import subprocess
import sys
import types

import pytest
from jax.sharding import AbstractMesh

import k2jax
import plan
import cli
from k2jax import expert_parallel, param_sharding, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = k2jax.ModelConfig.preset("tiny")


def abstract_mesh(**sizes):
    return AbstractMesh(tuple(sizes.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES)


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_plan_missing_config_subprocess_is_one_line():
    out = subprocess.run([sys.executable, "-m", "cli", "plan", "--config", "nope"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("k2jax plan: error: --config nope: no such file or directory")


@pytest.mark.parametrize("content, words", [
    (None, ["no config.json"]),
    ("{not json", ["not valid JSON"]),
    ({"bogus_field": 1}, ["unknown fields", "bogus_field"]),
])
def test_plan_bad_config_is_one_line(tmp_path, capsys, content, words):
    path = tmp_path
    if content is not None:
        path = tmp_path / "config.json"
        if isinstance(content, dict):
            content = json.dumps({**TINY.to_hf(), **content})
        path.write_text(content)
    assert cli.main(["plan", "--config", str(path), "--mesh", "expert=2"]) == 2
    one_line_error(capsys, f"--config {path}", *words)


def test_plan_mesh_that_does_not_split_the_experts_is_one_line(capsys):
    assert cli.main(["plan", "--config", "tiny", "--mesh", "expert=3"]) == 2
    err = one_line_error(capsys, "--mesh expert=3", "8 routed experts", "3 devices")
    assert "1, 2, 4, 8" in err


def test_train_missing_config_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    one_line_error(capsys, "nope.yaml: no such file or directory")


def test_check_mesh_refuses_axes_that_do_not_divide():
    with pytest.raises(sharding.MeshError, match=r"expert=3: 8 routed experts do not split "
                                                 r"evenly over 3 devices; use a divisor of 8 "
                                                 r"\(1, 2, 4, 8\)"):
        sharding.check_mesh(TINY, "expert=3")
    # The expert-parallel group is fsdp x expert.
    with pytest.raises(sharding.MeshError, match="fsdp=2 x expert=8 = 16 devices"):
        sharding.check_mesh(TINY, {"fsdp": 2, "expert": 8})
    with pytest.raises(sharding.MeshError, match="4 attention heads.*tensor=8"):
        sharding.check_mesh(TINY, "data=2,tensor=8")
    with pytest.raises(sharding.MeshError, match="64 hidden channels"):
        sharding.check_mesh(TINY.replace(n_routed_experts=12, vocab_size=768), "fsdp=3")
    for ok in ("expert=8", "data=2,expert=4", "fsdp=2,tensor=2,expert=2", "data=3", None):
        sharding.check_mesh(TINY, ok)


def test_param_specs_and_expert_axes_refuse_a_mesh_that_drops_expert_parallelism():
    mesh = abstract_mesh(expert=3)
    with pytest.raises(sharding.MeshError, match="8 routed experts.*3 devices"):
        param_sharding.param_specs(TINY, mesh)
    with pytest.raises(sharding.MeshError, match="8 routed experts.*3 devices"):
        expert_parallel.expert_axes(mesh, TINY.n_routed_experts)
    assert expert_parallel.expert_axes(abstract_mesh(expert=4), 8) == ("expert",)


def test_plan_api_refuses_a_mesh_that_drops_tensor_parallelism():
    with pytest.raises(sharding.MeshError, match="4 attention heads.*8 devices"):
        plan.plan(TINY, "tensor=8")


def _fake_command(monkeypatch, module_name, source):
    module = types.ModuleType(module_name)
    module.__dict__["add_arguments"] = lambda parser: None
    exec(compile(source, module_name, "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module_name, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module_name, "a test command"))


def test_own_value_errors_are_one_line(monkeypatch, capsys):
    _fake_command(monkeypatch, "k2jax._fake_command",
                  "def run(args):\n    raise ValueError('bad --thing')\n")
    assert cli.main(["fake"]) == 2
    one_line_error(capsys, "k2jax fake: error: bad --thing")


def test_value_errors_raised_in_libraries_keep_their_traceback(monkeypatch):
    _fake_command(monkeypatch, "k2jax._fake_command",
                  "import json\ndef run(args):\n    json.loads('{')\n")
    with pytest.raises(json.JSONDecodeError):
        cli.main(["fake"])

"""A hub directory given where a k2jax checkpoint belongs is refused with the command that
converts it, in one line, by `k2jax.load`, `k2jax generate` and `k2jax serve` alike."""

import shutil

import pytest

import k2jax
from k2jax.checkpoint import CheckpointError
from cli import main


def _message(path):
    return (f"{path} is a Hugging Face checkpoint, not an Orbax one: convert it first with "
            f"`k2jax convert {path} OUT` and pass OUT")


def test_hub_directory_names_the_convert_command(k2_hub, capsys):
    with pytest.raises(CheckpointError) as info:
        k2jax.load(k2_hub.path)
    assert str(info.value) == _message(k2_hub.path)
    assert main(["generate", "--checkpoint", k2_hub.path, "--prompt-ids", "1,2"]) == 2
    assert capsys.readouterr().err == f"k2jax generate: error: {_message(k2_hub.path)}\n"
    assert main(["serve", "--checkpoint", k2_hub.path, "--port", "0"]) == 2
    assert capsys.readouterr().err == f"k2jax serve: error: {_message(k2_hub.path)}\n"


def test_paths_are_quoted_for_the_shell(k2_hub, tmp_path):
    path = tmp_path / "my model"
    shutil.copytree(k2_hub.path, path)
    with pytest.raises(CheckpointError, match=f"`k2jax convert '{path}' OUT`"):
        k2jax.load(path)


def test_absent_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'absent'}: no such directory$"):
        k2jax.load(tmp_path / "absent")

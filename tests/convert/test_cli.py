"""`k2jax convert`: the --help example runs as written, errors are one line."""

import shlex

import pytest

from convert import cli
from cli import main


def test_help_example_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert cli.EXAMPLE in capsys.readouterr().out
    # Run the tiny example as written, in a temporary directory.
    text = cli.EXAMPLE.split("\n\n")[0].replace("/tmp/", f"{tmp_path}/").replace("\\\n", "")
    commands = [line.strip() for line in text.splitlines()[1:]]
    assert commands[0].startswith("python -c ") and len(commands) == 3
    exec(shlex.split(commands[0])[2], {})
    for command in commands[1:]:
        assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert "wrote k2jax checkpoint" in capsys.readouterr().out
    assert (tmp_path / "k2-tiny-orbax" / "config.json").exists()


def test_input_errors_print_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"k2jax convert: error: {tmp_path / 'absent'}: no such directory\n"
    assert main(["convert", "--to", "hf", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"k2jax convert: error: {tmp_path}: not a complete k2jax checkpoint")
    assert err.count("\n") == 1


def test_sizes():
    assert cli.parse_size("5GB") == 5 * 10**9
    assert cli.parse_size("500MiB") == 500 * 2**20
    assert cli.parse_size("1000") == 1000

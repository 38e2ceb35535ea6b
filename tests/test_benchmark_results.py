"""Benchmarks write JSON only when asked: `--write` (benchmarks/results/NAME.json) or
`--json PATH`; a plain run leaves the committed results alone."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _results_module():
    spec = importlib.util.spec_from_file_location("_results", BENCHMARKS / "_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser, "demo")
    return parser.parse_args(argv)


def test_nothing_is_written_unless_asked(tmp_path, monkeypatch, capsys):
    results = _results_module()
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    results.write(_parse(results, []), "demo", {"rows": 1})
    assert not (tmp_path / "results").exists() and capsys.readouterr().out == ""
    results.write(_parse(results, ["--write"]), "demo", {"rows": 2})
    assert json.loads((tmp_path / "results" / "demo.json").read_text()) == {"rows": 2}
    chosen = tmp_path / "elsewhere" / "run.json"
    results.write(_parse(results, ["--json", str(chosen)]), "demo", {"rows": 3})
    assert json.loads(chosen.read_text()) == {"rows": 3}
    assert json.loads((tmp_path / "results" / "demo.json").read_text()) == {"rows": 2}
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'results' / 'demo.json'}", f"wrote {chosen}"]
    with pytest.raises(SystemExit):
        _parse(results, ["--write", "--json", str(chosen)])


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("[a-z]*.py")))
def test_every_benchmark_writes_through_the_options(script):
    source = (BENCHMARKS / script).read_text()
    name = script.removesuffix(".py")
    assert f'_results.add_arguments(parser, "{name}")' in source
    assert "write_text(json" not in source and "RESULTS =" not in source

"""The README's train block: corpus, a run with --export, then the resume with more steps."""

import json

from tests.readme.conftest import _commands, _run


def test_train_block_with_resume(user):
    outputs = [_run(c, user) for c in _commands("python -c") + _commands("k2jax train")]
    work = user / "work"
    assert len((work / "corpus.jsonl").read_text().splitlines()) == 64
    steps = [json.loads(line)["step"] for line in
             (work / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert max(steps) == 100
    assert (work / "runs" / "tiny-int4" / "config.json").exists()
    assert len(outputs) == 3



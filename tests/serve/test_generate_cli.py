"""`k2jax generate` with text prompts: the tokenizer of a checkpoint, a preset or `--tokenizer`,
chat mode parsed like the server's, and option mistakes refused in one line."""

import json

import jax
import pytest

import k2jax
from cli import main
from k2jax.text import load_tokenizer
from k2jax.text.testing import tiny_tokenizer, write_tiny_tiktoken_file
from serve import generation
from serve.chat import render
from serve.server_cli import preset_and_tokenizer

TINY = ["generate", "--preset", "tiny", "--temperature", "0", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def tiny_model():
    """The model `k2jax generate --preset tiny` builds for text prompts: float32 on CPU, the
    vocabulary cut to the test tokenizer's, weights drawn with seed 0."""
    config = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
    config, tokenizer = preset_and_tokenizer(config, "tiny")
    return config, k2jax.init_params(config, jax.random.key(0)), tokenizer


def _json_run(argv, capsys):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_prompts_match_the_python_api(tiny_model, capsys):
    config, params, tokenizer = tiny_model
    prompts = ["The capital of France is", "Hello"]
    out = _json_run(TINY + ["--prompt", prompts[0], "--prompt", prompts[1]], capsys)
    expected = generation.generate((config, params), prompts, tokenizer=tokenizer,
                                   temperature=0, max_new_tokens=4)
    assert [r["prompt_token_ids"] for r in out] == [tokenizer.encode(p) for p in prompts]
    for got, want in zip(out, expected):
        (completion,) = got["outputs"]
        assert completion["token_ids"] == want.outputs[0].token_ids
        assert len(completion["token_ids"]) == 4
        assert completion["text"] == tokenizer.decode(completion["token_ids"])


def test_plain_output_shows_the_text(tiny_model, capsys):
    config, params, tokenizer = tiny_model
    assert main(TINY + ["--prompt", "Hello"]) == 0
    expected = generation.generate((config, params), "Hello", tokenizer=tokenizer,
                                   temperature=0, max_new_tokens=4)[0].outputs[0].text
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"prompt 0.0 ({len(tokenizer.encode('Hello'))} tokens) -> 4 tokens")
    assert first.endswith(f": {expected!r}")


def test_chat_renders_the_template_and_parses_the_answer(tiny_model, capsys):
    config, params, tokenizer = tiny_model
    out = _json_run(TINY + ["--chat", "--prompt", "What is 2 + 2?"], capsys)
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    assert out[0]["prompt_token_ids"] == render(tokenizer, conversation).token_ids
    expected = generation.generate((config, params), [conversation], tokenizer=tokenizer,
                                   temperature=0, max_new_tokens=4)[0].outputs[0]
    (completion,) = out[0]["outputs"]
    assert completion["token_ids"] == expected.token_ids
    assert completion["content"] == expected.content
    assert completion["reasoning_content"] == expected.reasoning_content
    assert main(TINY + ["--chat", "--prompt", "What is 2 + 2?"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"conversation 0.0 [{expected.finish_reason}]\n")
    assert f"  content: {expected.content}\n" in printed


def test_tokenizer_option_and_python_paths(tiny_model, tmp_path, capsys):
    file = write_tiny_tiktoken_file(tmp_path, vocab_size=512)
    out = _json_run(TINY + ["--prompt", "Hello", "--tokenizer", str(tmp_path)], capsys)
    tokenizer = load_tokenizer(file)
    assert tokenizer.vocab_size == 512
    assert out[0]["prompt_token_ids"] == tiny_tokenizer(512).encode("Hello")
    config, params, _ = tiny_model
    by_path = generation.generate((config, params), "Hello", tokenizer=str(tmp_path),
                                  temperature=0, max_new_tokens=2)
    by_object = generation.generate((config, params), "Hello", tokenizer=tokenizer,
                                    temperature=0, max_new_tokens=2)
    assert by_path[0].outputs[0].text == by_object[0].outputs[0].text


def test_load_tokenizer_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tiktoken.model in {tmp_path}"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer file or directory at"):
        load_tokenizer(tmp_path / "absent.model")


@pytest.mark.parametrize("extra, message", [
    (["--chat", "--prompt-ids", "1,2"], "--chat takes text prompts (--prompt TEXT)"),
    (["--chat", "--stream", "--prompt", "hi"], "--stream prints token deltas"),
    (["--tokenizer", "t.model", "--prompt-ids", "1,2"], "--tokenizer encodes --prompt TEXT"),
    (["--tokenizer", "absent.model", "--prompt", "hi"],
     "no tokenizer file or directory at absent.model"),
])
def test_option_mistakes_are_one_line(extra, message, capsys):
    assert main(TINY + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("k2jax generate: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_prompt_and_prompt_ids_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        main(TINY + ["--prompt", "hi", "--prompt-ids", "1,2"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err

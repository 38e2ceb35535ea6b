"""The files a model directory carries besides its weights, copied byte for byte both ways.

A hub model directory ships its tokenizer (K2's `tiktoken.model` with `tokenizer_config.json`,
or HF's `tokenizer.json`, ...), its chat template, `generation_config.json` and, for a model
type transformers does not know (Kimi K2's `kimi_k2`), the code that `config.json`'s `auto_map`
names (`configuration_deepseek.py`, `modeling_deepseek.py`, `tokenization_kimi.py`). Without
them a converted checkpoint cannot be served or loaded on its own, so `k2jax convert` copies
them into the top level of the k2jax checkpoint, beside `config.json` and `params/` (where
`k2jax serve --checkpoint DIR` finds `DIR/tiktoken.model`), and from there into an export.

Only top-level regular files are taken, symlinks followed (a hub cache snapshot is symlinks
into its blob store). `config.json` and the weights are never among them: the converters
write those.
"""

from __future__ import annotations

import filecmp
import os
import shutil

NAMES = frozenset({
    "tiktoken.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
    "generation_config.json",
})
CODE_SUFFIX = ".py"


def bundled_files(directory: str) -> list[str]:
    """Names of the files in `directory` that travel with the weights, sorted."""
    return sorted(name for name in os.listdir(directory)
                  if (name in NAMES or name.endswith(CODE_SUFFIX))
                  and os.path.isfile(os.path.join(directory, name)))


def copy_bundled(src_dir: str, dst_dir: str, *, replace: bool = True) -> list[str]:
    """Copies the bundled files of `src_dir` into `dst_dir`; returns the names written.

    Each lands through a temporary file, an fsync and a rename, so it is whole before a later
    `config.json` marks the directory complete. Identical files are left alone, and with
    `replace=False` so is every file `dst_dir` already has.
    """
    written = []
    for name in bundled_files(src_dir):
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if os.path.exists(dst) and (not replace or filecmp.cmp(src, dst, shallow=False)):
            continue
        tmp = dst + ".tmp"
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        written.append(name)
    return written


def code_files(auto_map: dict) -> set[str]:
    """The local `.py` files an `auto_map` refers to.

    Values are "module.Class", a list of them ([slow, fast] tokenizer classes, null allowed),
    or "owner/repo--module.Class", whose code lives in another hub repository.
    """
    refs = []
    for value in auto_map.values():
        refs += value if isinstance(value, (list, tuple)) else [value]
    return {ref.rsplit(".", 1)[0].replace(".", "/") + CODE_SUFFIX
            for ref in refs if isinstance(ref, str) and "--" not in ref}

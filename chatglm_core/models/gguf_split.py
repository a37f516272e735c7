"""A GGUF tokenizer read by transformers must split text the way llama.cpp (and the model's
authors) do.

transformers rebuilds a GGUF file's BPE tokenizer from its vocabulary and merges, and picks the
pre-tokenizer (how text is cut into words before merging) from `tokenizer.ggml.pre` through its own
table. Types missing from that table fall back to GPT-2's split. SmolLM2 (the embedded model) is
one: its type "smollm" cuts every digit off first (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM, as the
model's own tokenizer.json does with `Digits`), so "following:\n\n1." was "\n", "\n" (198, 198)
for us and "\n\n" (1116) for llama.cpp and the model. Two effects: our prompts were not the
tokens the model was trained on wherever whitespace met a digit (numbered lists, which chat
replies are full of), and a reply the model wrote as 1116 came back as 198, 198 in the next turn's
prompt, so the prefix cache stopped matching there.

Only the rule transformers lacks is written here; the table is llama.cpp's (llama-vocab.cpp). The
split is set on the tokenizer each time it is loaded (`load`), so folders cached by older versions
are right too. Reading the type from the GGUF file takes ~2 s (the `gguf` reader parses the whole
vocabulary), so it is read once per cached folder and kept in it (`MARKER`); where the folder is
read-only it is read again at each start, with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: `tokenizer.ggml.pre` values llama.cpp splits with "\p{N}" (each digit alone), then GPT-2's
#: expression (LLAMA_VOCAB_PRE_TYPE_SMOLLM / CODESHELL / EXAONE / MINERVA / MELLUM2).
DIGITS_THEN_GPT2 = frozenset({"smollm", "codeshell", "exaone", "exaone-moe", "minerva-7b", "mellum2"})
#: Written into a tokenizer folder once its split has been checked against the GGUF file.
MARKER = "gguf-pre-tokenizer.json"


def pre_type(gguf: Path) -> str | None:
    """The file's `tokenizer.ggml.pre` (None when it has none)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def fix_split(tokenizer: Any, pre: str | None) -> bool:
    """Give `tokenizer` llama.cpp's split for `pre` where transformers' differs; whether it changed."""
    if pre not in DIGITS_THEN_GPT2:
        return False
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return True


def split_type(folder: Path, gguf: Path) -> str | None:
    """`gguf`'s pre-tokenizer type, remembered in `folder` (the tokenizer converted from it)."""
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text())["tokenizer.ggml.pre"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        pre = pre_type(gguf)
    except (OSError, ValueError) as e:  # the source file moved, or is not a GGUF file any more
        log.warning("could not read the pre-tokenizer type of %s (%s): keeping transformers' split", gguf, e)
        return None
    try:
        marker.write_text(json.dumps({"tokenizer.ggml.pre": pre}))
    except OSError as e:
        log.warning("could not write %s (%s): the type is read from the GGUF file at each start", marker, e)
    return pre


def load(folder: Path, gguf: Path, **kwargs: Any) -> Any:
    """AutoTokenizer.from_pretrained(folder) with llama.cpp's split for `gguf`'s type."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if fix_split(tokenizer, split_type(folder, gguf)):
        log.debug("%s: tokenizer split set to llama.cpp's rule", folder.name)
    return tokenizer

"""ChatGLM3's tokenizer, rebuilt from its `tokenizer.model` without the checkpoint's Python code.

ChatGLM3 appends nine control tokens after the SentencePiece vocabulary in code
(`tokenization_chatglm.py`), not in the model file. This class does the same, and offers the
slice of the Hugging Face tokenizer interface our backend and xgrammar use (`encode`, `decode`,
`convert_tokens_to_ids`, `get_vocab`, `eos_token_id`, `sp_model`, ...).

Why not a `PreTrainedTokenizerFast`: it would match the control tokens inside ordinary text, so
a user typing "<|assistant|>" could forge a turn; here `encode` only ever sees plain text, and
the control tokens enter a prompt solely by id (see `formats/chatglm3.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chatglm_core.errors import ConfigError

#: In ChatGLM3's order: their ids are the SentencePiece vocabulary size + 0, 1, 2, ...
SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)


class ChatGLM3Tokenizer:
    padding_side = "left"
    eos_token = "</s>"
    pad_token = "<unk>"
    unk_token = "<unk>"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece

        model_file = Path(model_file)
        if not model_file.is_file():
            raise ConfigError(f"{model_file} is missing: a ChatGLM3 folder needs its SentencePiece tokenizer.model")
        self.sp_model = sentencepiece.SentencePieceProcessor()
        try:
            self.sp_model.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ConfigError(
                f"{model_file} is not a SentencePiece model ({e}). ChatGLM3 ships one; GLM-4's tokenizer.model is "
                "a tiktoken file, which this loader does not read."
            ) from None
        self.name_or_path = str(model_file.parent)
        n = self.sp_model.vocab_size()
        self.special_tokens = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self.special_tokens.items()}
        self.bos_token_id = self.sp_model.bos_id()
        self.eos_token_id = self.sp_model.eos_id()
        self.pad_token_id = self.sp_model.unk_id()  # ChatGLM3 pads with <unk>
        self.unk_token_id = self.sp_model.unk_id()
        # decoded as nothing, whatever skip_special_tokens says (ChatGLM3 does the same)
        self._silent_ids = {self.bos_token_id, self.eos_token_id, self.pad_token_id}

    # --- sizes and vocabulary ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sp_model.vocab_size() + len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return len(self)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._silent_ids | set(self._special_by_id))

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.IdToPiece(i): i for i in range(self.sp_model.vocab_size())}
        vocab.update(self.special_tokens)
        return vocab

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.sp_model.PieceToId(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            if ids in self._special_by_id:
                return self._special_by_id[ids]
            return self.sp_model.IdToPiece(ids) if 0 <= ids < self.sp_model.vocab_size() else ""
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def get_command(self, token: str) -> int:
        """The id of one of ChatGLM3's control tokens (ChatGLM3's own name for this lookup)."""
        return self.special_tokens[token]

    # --- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        """Plain text → ids. Control-token text stays text. With add_special_tokens, the
        `[gMASK] sop` prefix ChatGLM3 puts before every prompt comes first (as its tokenizer does)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self.sp_model.encode(text)
        return self.prefix_ids() + ids if add_special_tokens else ids

    def prefix_ids(self) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None,
                 **_: Any) -> dict[str, Any]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        if return_tensors == "pt":
            import torch

            tensor = torch.tensor([ids], dtype=torch.long)
            return {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        """Ids → text. Runs of ordinary ids go through SentencePiece together (so byte pieces join
        into characters); control tokens become their text unless skip_special_tokens; <s>, </s>,
        <unk>/pad and ids past the vocabulary (the padded rows of the output layer) become nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text, run = [], []
        n = self.sp_model.vocab_size()
        for i in map(int, ids):
            if i in self._special_by_id:
                if run:
                    text.append(self.sp_model.decode(run))
                    run = []
                if not skip_special_tokens:
                    text.append(self._special_by_id[i])
            elif 0 <= i < n and i not in self._silent_ids:
                run.append(i)
        if run:
            text.append(self.sp_model.decode(run))
        return "".join(text)

    def batch_decode(self, sequences: Iterable[Any], skip_special_tokens: bool = False, **kw: Any) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kw) for s in sequences]

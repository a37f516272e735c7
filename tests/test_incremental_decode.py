"""IncrementalDecode: a reply's text decoded a few tokens at a time equals the whole decode at
every token, on a byte-level BPE tokenizer (SmolLM2's) and a SentencePiece one (ChatGLM3's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatglm_core.backends.decoding import IncrementalDecode

TEXTS = [
    "Hello, world! This is a test of streaming text.",
    "  leading spaces, trailing spaces   \n\n1. one\n2. two\n\n\tTabbed\r\nCRLF",
    "Emoji split across tokens: 🙂🙃🤖👩‍👩‍👧 and accents: naïve café Ünïcödé",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "▁ looks like a marker; <tool_call> is text here; don't stop",
]


def _assert_matches_whole(tokenizer, decode) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        inc = IncrementalDecode(decode)
        for n in range(1, len(ids) + 1):
            assert inc(ids[:n]) == decode(ids[:n]), (text, n)


def test_byte_level_bpe(small_backend):
    tok = small_backend.tokenizer
    _assert_matches_whole(tok, lambda ids: tok.decode(ids, skip_special_tokens=True))


def test_the_reply_decoder_decodes_as_the_tokenizer_does(small_backend):
    """The backend's reply decoder (straight from the Rust tokenizer when transformers has no clean-up
    to do) gives tokenizer.decode's text at every token, special tokens skipped."""
    tok = small_backend.tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        ids = ids[:3] + [tok.convert_tokens_to_ids("<|im_start|>")] + ids[3:]  # a special token inside
        decode = small_backend.reply_decoder()
        for n in range(1, len(ids) + 1):
            assert decode(ids[:n]) == tok.decode(ids[:n], skip_special_tokens=True), (text, n)


def test_sentencepiece():
    from chatglm_core.models.chatglm3_tokenizer import ChatGLM3Tokenizer

    tok = ChatGLM3Tokenizer(Path(__file__).parent / "fixtures" / "chatglm3-tiny" / "tokenizer.model")
    _assert_matches_whole(tok, lambda ids: tok.decode(ids, skip_special_tokens=True))


def test_it_decodes_only_the_last_tokens_and_starts_over_on_a_shorter_list(small_backend):
    tok = small_backend.tokenizer
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return tok.decode(ids, skip_special_tokens=True)

    ids = tok.encode(" ".join(["word"] * 200), add_special_tokens=False)
    inc = IncrementalDecode(decode)
    for n in range(1, len(ids) + 1):
        inc(ids[:n])
    assert max(lengths) <= 4, "each token decodes a few tokens, not the whole reply"
    assert inc(ids[:3]) == tok.decode(ids[:3])  # a list that shrank: a whole decode, then on from there
    assert inc(ids[:4]) == tok.decode(ids[:4])


@pytest.mark.parametrize("reply", ["A reply with a stop word STOP in it", "Numbers 1, 22, 333 and 🙂"])
def test_the_engine_streams_what_it_decodes_whole(small_engine, reply):
    """Streamed deltas add up to the Done's text with the incremental decoder in the loop."""
    from chatglm_core.backends.base import GenerationOptions
    from chatglm_core.messages import Done, Message, Role, TextDelta

    text, done = "", None
    for ev in small_engine.stream([Message(Role.USER, f"Repeat exactly: {reply}")],
                                  GenerationOptions(temperature=0, max_new_tokens=24)):
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, Done):
            done = ev
    assert done is not None and text and text.strip() == done.message.content.strip()


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_the_incremental_repetition_penalty_equals_transformers(penalty):
    """RepetitionPenalty (distinct ids kept, logits changed in place) gives transformers'
    RepetitionPenaltyLogitsProcessor's scores at every step of a growing sequence, on torch scores
    and on numpy ones (llama.cpp's logits, penalized in place from the prompt and reply lists)."""
    import numpy as np
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from chatglm_core.backends.decoding import RepetitionPenalty

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (1, 40), generator=gen)  # repeats, like a real prompt
    prompt, reply = ids[0].tolist(), []
    ours, ours_np, theirs = RepetitionPenalty(penalty), RepetitionPenalty(penalty), RepetitionPenaltyLogitsProcessor(penalty)
    for _ in range(30):
        scores = torch.randn(1, 64, generator=gen) * 5
        expected = theirs(ids, scores.clone())
        assert torch.equal(ours(ids, scores.clone()), expected)
        flat = scores[0].numpy().copy()
        ours_np.penalize(flat, prompt, reply)
        assert flat.dtype == np.float32 and np.array_equal(flat, expected[0].numpy())
        token = torch.randint(0, 64, (1, 1), generator=gen)
        ids = torch.cat([ids, token], dim=-1)
        reply.append(int(token))


def test_greedy_sampling_of_numpy_logits_equals_the_torch_path():
    """Decoding.sample takes llama.cpp's logits as numpy arrays: greedy with a repetition penalty is
    sampled in numpy, and picks what the torch path picks from the same logits at every step (ties
    included: both take the first maximum)."""
    import torch

    from chatglm_core.backends.base import GenerationOptions
    from chatglm_core.backends.decoding import Decoding, build_processors

    def decoding(penalty):
        opts = GenerationOptions(temperature=0.0, repetition_penalty=penalty, max_new_tokens=64)
        return Decoding(list(range(20)), opts, max_new=64, stop_token_ids=[], decode=lambda ids: "", parse=None,
                        processors=build_processors(opts, None, "chatml"), tools=False, interpreter=False)

    gen = torch.Generator().manual_seed(1)
    for penalty in (1.0, 1.05, 1.3, 0.8):
        on_numpy, on_torch = decoding(penalty), decoding(penalty)
        assert on_numpy._numpy
        for step in range(40):
            logits = torch.randn(64, generator=gen) * 3
            logits[7] = logits[9] = logits.max() + 1  # a tie
            token = on_numpy.sample(logits.numpy().copy())
            assert token == on_torch.sample(logits.clone()), (penalty, step)
            on_numpy.accept(token), on_torch.accept(token)

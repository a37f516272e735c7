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


def test_numpy_greedy_equals_the_torch_path_when_ids_seen_lead():
    """The numpy greedy penalizes the best id while it is one already seen, and every id seen after a
    few rounds (a run of them at the top); either way it picks what the full penalty picks: seen ids
    raised to the top, negative scores, and ties between a penalized id and an unseen one."""
    import torch

    from chatglm_core.backends.base import GenerationOptions
    from chatglm_core.backends.decoding import Decoding, build_processors

    gen = torch.Generator().manual_seed(2)
    for trial in range(300):
        penalty = (1.05, 1.3, 2.0)[trial % 3]
        opts = GenerationOptions(temperature=0.0, repetition_penalty=penalty, max_new_tokens=8)
        on_numpy, on_torch = (Decoding(list(range(20)), opts, max_new=8, stop_token_ids=[], decode=lambda ids: "",
                                       parse=None, processors=build_processors(opts, None, "chatml"), tools=False,
                                       interpreter=False) for _ in range(2))
        logits = torch.randn(64, generator=gen)
        lead = int(torch.randint(0, 12, (), generator=gen))
        logits[:lead] += 3  # ids 0..19 are the prompt's: seen
        if trial % 5 == 0:
            logits -= 6  # all negative: the penalty multiplies
        if trial % 7 == 0:  # an unseen id equal to a seen one's penalized score, before or after it
            logits[40] = logits[0] / penalty if logits[0] > 0 else logits[0] * penalty
        assert on_numpy.sample(logits.numpy().copy()) == on_torch.sample(logits.clone()), trial


def test_sampling_numpy_logits_draws_from_the_torch_paths_nucleus():
    """Sampled decoding of numpy logits (temperature, top_p, repetition penalty, no top_k) keeps the
    nucleus the torch path keeps, draws each token as often as its probability says, and repeats
    itself under a seed (its uniform numbers are Python's, seeded per request)."""
    import numpy as np
    import torch

    from chatglm_core.backends.base import GenerationOptions
    from chatglm_core.backends.decoding import Decoding, build_processors, nucleus, nucleus_array

    gen = torch.Generator().manual_seed(0)
    for scale, top_p in [(0.5, 0.9), (3.0, 0.9), (8.0, 0.5), (0.01, 0.95), (3.0, 0.999), (20.0, 0.1), (1.0, 1e-9)]:
        probs = torch.softmax(torch.randn(49152, generator=gen) * scale, -1)
        _, theirs = nucleus(probs, top_p)
        _, ours = nucleus_array(probs.numpy() * 7.5, top_p)  # unnormalized, as sample_array passes them
        # the same set but for float rounding at the edge (at top_p 0.999, a few tokens of ~1e-7 each)
        edge = set(ours.tolist()) ^ set(theirs.tolist())
        assert float(probs[list(edge)].sum()) < 1e-5, (scale, top_p)

    def decoding(seed=None, temperature=0.7, top_p=0.8, top_k=0, penalty=1.0):
        opts = GenerationOptions(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty,
                                 max_new_tokens=8, seed=seed)
        return Decoding([0, 1], opts, max_new=8, stop_token_ids=[], decode=lambda ids: "", parse=None,
                        processors=build_processors(opts, None, "chatml"), tools=False, interpreter=False)

    assert decoding(penalty=1.05)._numpy and not decoding(top_k=3)._numpy  # top_k stays on torch
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
    scaled = torch.tensor(logits) / 0.7
    probs = torch.softmax(scaled, -1)
    order = probs.argsort(descending=True)
    kept = torch.zeros(6, dtype=torch.bool)
    kept[order[(probs[order].cumsum(0) - probs[order]) < 0.8]] = True
    expected = probs * kept / (probs * kept).sum()
    dec = decoding()
    draws = torch.tensor([dec.sample(logits.copy()) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=6) / len(draws)
    assert (freq[~kept] == 0).all() and torch.allclose(freq, expected, atol=0.015)
    # the penalty lowers what was seen (ids 0 and 1, the prompt) before the draw, as on torch
    penalized = decoding(penalty=3.0, top_p=1.0)
    freq = torch.bincount(torch.tensor([penalized.sample(logits.copy()) for _ in range(20000)]), minlength=6) / 20000
    pen = torch.tensor(logits)
    pen[:2] = torch.where(pen[:2] < 0, pen[:2] * 3.0, pen[:2] / 3.0)
    assert torch.allclose(freq, torch.softmax(pen / 0.7, -1), atol=0.015)
    a, b = decoding(seed=7), decoding(seed=7)
    assert [a.sample(logits.copy()) for _ in range(50)] == [b.sample(logits.copy()) for _ in range(50)]

"""The engine and the transformers backend on the real SmolLM2, loaded through the real path."""

import threading
import time

import pytest

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.errors import RequestError
from chatglm_core.messages import Done, Message, Role, TextDelta

GREEDY = GenerationOptions(temperature=0, max_new_tokens=40)
FRANCE = [Message(Role.USER, "What is the capital of France?")]


def collect(engine, messages, options=GREEDY, **kw):
    text, done = "", None
    for ev in engine.stream(messages, options, **kw):
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            done = ev
    return text, done


def test_greedy_output_is_exact(small_engine):
    text, done = collect(small_engine, FRANCE)
    assert text == "The capital of France is Paris."
    assert done.message.content == text
    assert done.finish_reason == "stop"
    assert done.usage.prompt_tokens == 37
    assert done.usage.completion_tokens == 8  # 7 text tokens + <|im_end|>


def test_streaming_equals_non_streaming_and_generate(small_engine, small_backend):
    import torch

    q = [Message(Role.USER, "Write a haiku about the sea.")]
    opts = GenerationOptions(temperature=0, max_new_tokens=30)
    text, done = collect(small_engine, q, opts)
    assert small_engine.complete(q, opts).message.content == done.message.content == text.strip()
    ids = small_backend.prompt_ids(q)
    with torch.inference_mode():
        out = small_backend.model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)
    assert small_backend.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip() == text.strip()
    assert done.finish_reason == "length"


def test_stop_strings_cut_the_reply(small_engine):
    opts = GenerationOptions(temperature=0, max_new_tokens=40, stop=["Paris"])
    text, done = collect(small_engine, FRANCE, opts)
    assert text == "The capital of France is "
    assert done.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(small_engine):
    opts = GenerationOptions(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=1234)
    assert collect(small_engine, FRANCE, opts)[0] == collect(small_engine, FRANCE, opts)[0]


def test_cancel_stops_within_a_token_and_frees_the_model(small_engine):
    cancel = threading.Event()
    opts = GenerationOptions(temperature=0, max_new_tokens=400)
    story = [Message(Role.USER, "Tell me a very long story about a dragon.")]
    seen = 0
    done = None
    for ev in small_engine.stream(story, opts, cancel=cancel):
        if isinstance(ev, TextDelta):
            seen += 1
            if seen == 3:
                cancel.set()
        else:
            done = ev
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens <= 5
    # the lock is free again: the next caller starts at once
    assert collect(small_engine, FRANCE, GenerationOptions(temperature=0, max_new_tokens=3))[1].usage.completion_tokens == 3


def test_closing_the_stream_cancels(small_engine):
    gen = small_engine.stream([Message(Role.USER, "Count to one hundred.")],
                              GenerationOptions(temperature=0, max_new_tokens=400))
    next(gen)
    assert small_engine.busy() == 1
    gen.close()
    deadline = time.monotonic() + 5
    while small_engine.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert small_engine.busy() == 0, "generation kept running after the caller left"


def test_four_concurrent_callers_get_their_own_greedy_output(small_engine):
    prompts = ["What is 2+2?", "Name a color.", "Say hello in French.", "What is the capital of Italy?"]
    opts = GenerationOptions(temperature=0, max_new_tokens=16)
    expected = [collect(small_engine, [Message(Role.USER, p)], opts)[0] for p in prompts]
    got = concurrently(small_engine, [([Message(Role.USER, p)], opts, {}) for p in prompts])
    assert [text for text, _ in got] == expected


EIGHT = ["What is 2+2?", "Name a color.", "Say hello in French.", "What is the capital of Italy?",
         "Write a haiku about the sea.", "List three fruits.", "Who wrote Hamlet?", "Explain gravity in one sentence."]


def concurrently(engine, jobs, stagger=0.0):
    """Run (messages, options, kwargs) jobs on their own threads, released together (then job i
    waits stagger * i seconds); returns each one's (text, done)."""
    results: dict[int, tuple[str, Done]] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        time.sleep(stagger * i)
        messages, options, kw = jobs[i]
        results[i] = collect(engine, messages, options, **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [results[i] for i in range(len(jobs))]


def test_eight_concurrent_callers_are_batched_and_get_their_single_stream_output(small_engine, small_backend):
    """Rows join a running batch (staggered), finish at different lengths and leave; each row's
    greedy text equals what the backend alone produces for that prompt."""
    opts = GenerationOptions(temperature=0, max_new_tokens=24)
    jobs = [([Message(Role.USER, p)], opts, {}) for p in EIGHT]
    expected = [collect_backend(small_backend, m, o) for m, o, _ in jobs]
    peak = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.is_set():
            peak.append(small_engine.busy())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    got = concurrently(small_engine, jobs, stagger=0.02)
    finished.set()
    watcher.join()
    assert [text for text, _ in got] == expected
    assert max(peak) >= 4, "requests did not overlap"
    assert all(done.finish_reason in ("stop", "length") for _, done in got)


def test_batched_rows_keep_their_own_options_and_cancellation(small_engine, small_backend):
    """Different sampling options, stop strings and penalties in one batch; one caller cancels."""
    jobs = [
        (FRANCE, GenerationOptions(temperature=0, max_new_tokens=20, stop=["Paris"]), {}),
        ([Message(Role.USER, "Name a color.")], GenerationOptions(temperature=0.9, top_p=0.9, max_new_tokens=20,
                                                                  seed=7), {}),
        ([Message(Role.USER, "List three fruits.")], GenerationOptions(temperature=0, max_new_tokens=20,
                                                                       repetition_penalty=1.3), {}),
        ([Message(Role.USER, "Who wrote Hamlet?")], GenerationOptions(temperature=0, max_new_tokens=20,
                                                                      frequency_penalty=0.5), {}),
    ]
    expected = [collect_backend(small_backend, m, o) for m, o, _ in jobs]
    cancel = threading.Event()
    story = [Message(Role.USER, "Tell me a very long story about a dragon.")]

    def cancelled_caller() -> Done:
        done = None
        for n, ev in enumerate(small_engine.stream(story, GenerationOptions(temperature=0, max_new_tokens=400),
                                                   cancel=cancel)):
            if n == 3:
                cancel.set()
            if isinstance(ev, Done):
                done = ev
        return done

    box = []
    t = threading.Thread(target=lambda: box.append(cancelled_caller()))
    t.start()
    got = concurrently(small_engine, jobs)
    t.join(timeout=120)
    assert [text for text, _ in got] == expected
    assert got[0][0] == "The capital of France is " and got[0][1].finish_reason == "stop"
    assert box[0].finish_reason == "cancelled" and box[0].usage.completion_tokens <= 8


def test_bad_request_in_a_batch_fails_alone(small_engine, small_backend, monkeypatch):
    monkeypatch.setattr(small_backend, "context_window", 60)
    long = [Message(Role.USER, "word " * 80)]
    jobs = [(FRANCE, GenerationOptions(temperature=0, max_new_tokens=10), {})] * 2

    errors = []

    def bad() -> None:
        try:
            collect(small_engine, long)
        except RequestError as e:
            errors.append(e)

    t = threading.Thread(target=bad)
    t.start()
    got = concurrently(small_engine, jobs)
    t.join()
    assert len(errors) == 1 and "context window" in str(errors[0])
    assert all(text.startswith("The capital of France") for text, _ in got)


def collect_backend(backend, messages, options):
    return "".join(ev.text for ev in backend.stream(messages, options) if isinstance(ev, TextDelta))


def test_prompt_longer_than_context_is_a_request_error(small_engine, small_backend, monkeypatch):
    monkeypatch.setattr(small_backend, "context_window", 20)
    with pytest.raises(RequestError, match="context window"):
        collect(small_engine, FRANCE)


def test_a_prompt_that_cannot_fit_is_refused_by_its_length_before_tokenizing(small_backend, monkeypatch):
    from chatglm_core.backends.decoding import check_prompt_chars

    longest = small_backend.max_token_chars()
    vocab = small_backend.tokenizer.get_vocab()
    assert longest == max(map(len, vocab)) and 8 <= longest <= 256
    text = "Hello, world! Ünïcödé 你好 " * 50  # no token covers more characters than the longest one
    assert len(small_backend.tokenizer.encode(text, add_special_tokens=False)) * longest >= len(text)
    window = small_backend.context_window
    check_prompt_chars([Message(Role.USER, "x" * (window * longest))], None, window, longest)  # may still fit
    with pytest.raises(RequestError, match="characters") as e:
        check_prompt_chars([Message(Role.USER, "x" * (window * longest + 1))], None, window, longest)
    assert e.value.code == "context_length_exceeded"
    tools = [{"type": "function", "function": {"name": "t", "description": "d" * (window * longest)}}]
    with pytest.raises(RequestError, match="characters"):  # the tools' JSON counts too
        check_prompt_chars([Message(Role.USER, "hi")], tools, window, longest)
    monkeypatch.setattr(small_backend, "prompt_ids", lambda *a, **k: pytest.fail("tokenized a prompt that can't fit"))
    with pytest.raises(RequestError, match="context window"):
        small_backend.begin([Message(Role.USER, "x" * (window * longest + 1))], GREEDY)


def test_prompts_are_prepared_in_the_callers_thread_and_a_huge_one_stalls_no_stream(small_engine, small_backend,
                                                                                      monkeypatch):
    """A 12 M-character prompt (2 M tokens) sent while another caller streams: it is refused within a
    second, and the streaming caller never waits long for its next token (tokenized on the batch loop,
    it held every stream ~10 s)."""
    threads = []
    begin = small_backend.begin

    def recording_begin(*a, **k):
        threads.append(threading.current_thread().name)
        return begin(*a, **k)

    monkeypatch.setattr(small_backend, "begin", recording_begin)
    gaps, first = [], threading.Event()

    def streamer() -> None:
        last = None
        story = [Message(Role.USER, "Write a long story about a lighthouse keeper and a storm.")]
        for ev in small_engine.stream(story, GenerationOptions(temperature=0, max_new_tokens=60)):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            first.set()

    t = threading.Thread(target=streamer, name="streaming-caller")
    t.start()
    assert first.wait(60)
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match="characters") as e:
        collect(small_engine, [Message(Role.USER, "Hello " * 2_000_000)])
    refused = time.perf_counter() - t0
    t.join(60)
    assert e.value.code == "context_length_exceeded"
    assert refused < 2.0, f"refusing the huge prompt took {refused:.1f} s"
    assert gaps and max(gaps) < 2.0, f"the streaming caller waited {max(gaps):.1f} s for a token"
    assert threads == ["streaming-caller", threading.current_thread().name]  # never the engine's batch thread


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "must not be empty"),
        ([Message(Role.USER, "a"), Message(Role.SYSTEM, "b")], "system message may only come first"),
        ([Message(Role.TOOL, "x")], "tool message must follow"),
        ([Message(Role.USER, "a"), Message(Role.ASSISTANT, "b")], "last message"),
    ],
)
def test_bad_conversations_are_rejected(small_engine, messages, fragment):
    with pytest.raises(RequestError, match=fragment):
        collect(small_engine, messages)


def test_backend_failure_becomes_generation_error(scripted):
    from chatglm_core.errors import GenerationError

    engine = Engine(scripted)  # nothing enqueued: the backend raises
    with pytest.raises(GenerationError, match="generation failed"):
        collect(engine, FRANCE)
    scripted.enqueue("still works")
    assert collect(engine, FRANCE)[0] == "still works"


def test_chatglm3_checkpoint_through_the_engine(small_settings):
    """MODEL_PATH at a ChatGLM3 folder: native loading, ChatGLM3 format, reference greedy reply."""
    import json
    from pathlib import Path

    from chatglm_core.backends import load_backend
    from chatglm_core.formats.chatglm3 import ChatGLM3Format

    fixture = Path(__file__).parent / "fixtures" / "chatglm3-tiny"
    ref = json.loads((fixture / "reference.json").read_text())
    backend = load_backend(small_settings.model_copy(update={"model_path": str(fixture)}))
    assert isinstance(backend.format, ChatGLM3Format)
    done = Engine(backend).complete([Message(Role.USER, "hello world")],
                                    GenerationOptions(temperature=0, max_new_tokens=122))
    assert done.raw_text == ref["chat_greedy_text"]
    assert done.usage.completion_tokens == 122 and done.finish_reason == "length"


def test_a_finished_generation_leaves_the_callers_event_alone(scripted):
    cancel = threading.Event()
    engine = Engine(scripted.enqueue("one", "two"))
    assert collect(engine, FRANCE, cancel=cancel)[0] == "one"
    assert not cancel.is_set()  # the same event can drive the next round of a tool loop
    assert collect(engine, FRANCE, cancel=cancel)[0] == "two"


def test_process_exits_cleanly_while_a_generation_runs(small_settings):
    """Exiting mid-generation must not abort: the batch worker is stopped before Python finalizes."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from chatglm_core.backends import load_backend\n"
        "from chatglm_core.backends.base import GenerationOptions\n"
        "from chatglm_core.engine import Engine\n"
        "from chatglm_core.messages import Message, Role\n"
        "from chatglm_core.settings import load_settings\n"
        f"engine = Engine(load_backend(load_settings(data_dir={str(small_settings.data_dir)!r}, device='cpu', "
        "backend='transformers')))\n"
        "stream = engine.stream([Message(Role.USER, 'Tell me a long story.')], "
        "GenerationOptions(temperature=0, max_new_tokens=300))\n"
        "print(next(stream).text, flush=True)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_sample_token_keeps_transformers_top_p_nucleus_and_draws_by_probability():
    """sample_token's nucleus is TopPLogitsWarper's, found without sorting the vocabulary; its draws
    follow the nucleus' renormalised probabilities."""
    import torch
    from transformers import TopPLogitsWarper

    from chatglm_core.backends.decoding import nucleus, sample_token

    def exact(probs, top_p):  # the definition, in float64 over a full sort
        p = probs.double().sort(descending=True)
        return set(p.indices[(p.values.cumsum(0) - p.values) < top_p].tolist())

    gen = torch.Generator().manual_seed(0)
    for scale, top_p in [(0.5, 0.9), (3.0, 0.9), (8.0, 0.5), (0.01, 0.95), (3.0, 0.999), (20.0, 0.1)]:
        scores = torch.randn(1, 49152, generator=gen) * scale
        probs = torch.softmax(scores[0], -1)
        _, ids = nucleus(probs, top_p)
        assert set(ids.tolist()) == exact(probs, top_p), (scale, top_p)
        # transformers' own float32 sums agree but for rounding at the edge (at top_p 0.999 it keeps
        # 6 more tokens of 1.7e-7 each)
        hf = set(TopPLogitsWarper(top_p)(None, scores.clone()).isfinite()[0].nonzero()[:, 0].tolist())
        assert float(probs[list(hf ^ set(ids.tolist()))].sum()) < 1e-5, (scale, top_p)
        kept = exact(probs, top_p)
        assert all(sample_token(scores, top_p, gen) in kept for _ in range(300)), (scale, top_p)
    # a small vocabulary: the nucleus is exactly HF's, and frequencies match probabilities
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]])
    kept = TopPLogitsWarper(0.8)(None, scores.clone()).isfinite()[0]
    probs = torch.softmax(scores[0], -1) * kept
    probs /= probs.sum()
    draws = torch.tensor([sample_token(scores, 0.8, gen) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=6) / len(draws)
    assert (freq[~kept] == 0).all() and torch.allclose(freq, probs, atol=0.015)
    full = torch.tensor([sample_token(scores, 1.0, gen) for _ in range(20000)])
    assert torch.allclose(torch.bincount(full, minlength=6) / 20000, torch.softmax(scores[0], -1), atol=0.015)
    assert {sample_token(torch.tensor([[0.0, float("-inf"), 5.0]]), 0.01, gen) for _ in range(50)} == {2}


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_running_row(small_backend):
    """transformers: a prompt longer than prefill_chunk is fed a chunk per step after the batch's own
    forward and joins when complete; both rows' logits are those of each sequence alone (fed the same
    tokens), and the running row gets its logits in every step of the prefill."""
    import torch

    from chatglm_core.backends.transformers_backend import KVRows

    short = small_backend.prompt_ids([Message(Role.USER, "Count from one to fifty in words.")])
    long = small_backend.prompt_ids([Message(Role.USER, "Summarize: " + "The committee met on Tuesday. " * 30)])
    assert len(short) <= 64 < 3 * 64 < len(long)

    def alone(ids, n):  # (logits, greedy tokens) of one sequence by itself, n steps
        rows = KVRows(small_backend.model, 1)
        slot, logits = rows.add(ids)
        out, toks = [logits], []
        for _ in range(n):
            toks.append(int(out[-1].argmax()))
            out.append(rows.step({slot: toks[-1]})[slot])
        return out, toks

    chunks = -(-len(long) // 64)
    ref_busy, busy_toks = alone(short, chunks + 6)
    ref_long, long_toks = alone(long, 6)
    rows = KVRows(small_backend.model, 2, prefill_chunk=64)
    busy, logits = rows.add(short)
    got_busy = [logits]
    slot, first = rows.add(long)
    assert first is None and slot in rows.prefilling
    for i in range(chunks):
        got = rows.step({busy: busy_toks[i]})
        got_busy.append(got[busy])
        assert (slot in got) == (i == chunks - 1)  # a chunk a step; the busy row has logits in each
    got_long = [got[slot]]
    for i in range(6):
        got = rows.step({busy: busy_toks[chunks + i], slot: long_toks[i]})
        got_busy.append(got[busy])
        got_long.append(got[slot])
    for mine, ref in ((got_busy, ref_busy), (got_long, ref_long)):
        assert max(float((a - b).abs().max()) for a, b in zip(mine, ref, strict=True)) < 1e-3
    rows.remove(slot)
    rows.remove(busy)
    assert rows.slots == [] and rows.cache is None and not rows.prefilling
    removed = KVRows(small_backend.model, 1, prefill_chunk=64)
    s, _ = removed.add(long)
    removed.remove(s)  # a caller that cancels while its prompt is still waiting
    assert not removed.prefilling and torch.is_tensor(removed.add(short)[1])


PARIS = [Message(Role.USER, "Tell me about the history of Paris in a few sentences.")]
FOLLOW_UPS = ["And of Rome?", "Which of the two is older?"]


def conversation(engine, options, others=()):
    """A three-turn chat (PARIS, then FOLLOW_UPS), each turn sent with the replies so far; the
    `others` prompts run between the second and third turn. Returns each turn's (text, done)."""
    convo, turns = list(PARIS), []
    for i, follow_up in enumerate([None, *FOLLOW_UPS]):
        if follow_up is not None:
            convo += [turns[-1][1].message, Message(Role.USER, follow_up)]
        if i == 2:
            for prompt in others:
                collect(engine, [Message(Role.USER, prompt)], options)
        turns.append(collect(engine, convo, options))
    return turns


def test_a_next_turn_starts_from_the_cached_prefix_and_replies_as_cold(small_backend, monkeypatch):
    """transformers: turn N+1's prompt begins with turn N's prompt and reply, so only the new part is
    prefilled (usage.cached_tokens); the greedy replies are the ones the same chat gets with no cache,
    also when other chats evict the entry between turns (a store of ~1.5 conversations)."""
    from chatglm_core.backends.transformers_backend import KVStore

    opts = GenerationOptions(temperature=0, max_new_tokens=24)
    monkeypatch.setattr(small_backend, "kv_store", None)
    cold = conversation(Engine(small_backend), opts)
    config = small_backend.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # float32 K and V
    monkeypatch.setattr(small_backend, "kv_store", KVStore(per_token * 160))
    warm = conversation(Engine(small_backend), opts, others=EIGHT[:2])
    assert [t for t, _ in warm] == [t for t, _ in cold] and all(t for t, _ in cold)
    assert [d.usage.cached_tokens for _, d in cold] == [0, 0, 0]
    first, second, third = (d.usage for _, d in warm)
    assert first.cached_tokens == 0
    # all of turn 1 (its last reply token was sampled, never fed) is the start of turn 2
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens - 1
    assert third.cached_tokens < first.prompt_tokens  # evicted: only the shared system prompt was left
    assert len(small_backend.kv_store.cache) >= 1 and small_backend.kv_store.cache.size <= per_token * 160


def test_a_row_started_from_a_cached_prefix_outlives_the_entry(small_backend):
    """transformers: a row copies the entry it starts from, so evicting the entry mid-generation (or
    a longer row ending in it) changes nothing: its logits are those of the prompt fed whole."""
    from chatglm_core.backends.transformers_backend import KVRows, KVStore

    store = KVStore(2**30)
    shared = small_backend.prompt_ids(PARIS)
    rows = KVRows(small_backend.model, 2, store=store)
    slot, _ = rows.add(shared + [28, 29])
    rows.remove(slot)  # its KV is kept
    prompt = shared + [30, 31, 32]
    slot, warm = rows.add(prompt)
    assert rows.cached_tokens(slot) == len(shared) and len(store.cache) == 1  # a diverging entry stays
    store.cache.pop(next(iter(store.cache)))  # evicted while the row runs
    cold_rows = KVRows(small_backend.model, 1)
    cold_slot, cold = cold_rows.add(prompt)
    for token in (5, 6, 7):
        assert float((warm - cold).abs().max()) < 1e-3
        warm, cold = rows.step({slot: token})[slot], cold_rows.step({cold_slot: token})[cold_slot]
    rows.remove(slot)
    assert store.cache.covering(prompt + [5, 6]) is not None  # it left its own entry

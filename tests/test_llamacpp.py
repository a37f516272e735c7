"""The llama.cpp backend on the real embedded GGUF: same prompt ids and sampling as transformers.

Needs llama-cpp-python (requirements-llamacpp.txt, installed by `make setup`); without it the
backend's tests skip and "auto" falls back to transformers (tested either way). By default the
embedded model's Q4_1 weights are converted once to float16 for llama.cpp (`gguf_weights`).
"""

from __future__ import annotations

import sys
import threading
import types

import pytest
import torch
from test_engine import EIGHT, concurrently

from chatglm_core.backends import llamacpp
from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.errors import ConfigError
from chatglm_core.messages import Done, Message, Role, TextDelta

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")
FRANCE = [Message(Role.USER, "What is the capital of France?")]


@pytest.fixture(scope="module")
def llama_backend(small_settings):
    backend = llamacpp.LlamaCppBackend.from_settings(small_settings.model_copy(update={"backend": "llamacpp"}))
    yield backend
    backend.close()


def text_of(events) -> tuple[str, Done]:
    text, done = "", None
    for ev in events:
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            done = ev
    return text, done


def reference_continuations(small_backend, n: int = 24) -> list[tuple[list[int], int, list[int]]]:
    """(prompt + greedy continuation, prompt length, reference argmax per generated position) from the
    transformers backend: the dequantized float32 weights, the reference the GGUF modes are held to."""
    import torch

    out = []
    for q in ("What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors."):
        ids = small_backend.prompt_ids([Message(Role.USER, q)])
        with torch.inference_mode():
            full = small_backend.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0].tolist()
            logits = small_backend.model(torch.tensor([full])).logits[0, len(ids) - 1:-1]
        out.append((full, len(ids), logits.argmax(-1).tolist()))
    return out


def top1_agreement(backend, references) -> float:
    """Teacher-forced: the share of positions where llama.cpp's next token is the reference's."""
    agree = total = 0
    for full, plen, ref in references:
        logits = backend.teacher_forced_logits(full[:-1], plen - 1)
        agree += sum(int(lg.argmax()) == r for lg, r in zip(logits, ref, strict=True))
        total += len(ref)
    return agree / total


@needs_llamacpp
def test_converted_weights_answer_like_the_reference(llama_backend, small_backend, small_settings):
    # the default ("auto") runs the embedded Q4_1 model as float16: the transformers reference token
    # for token; bfloat16 comes close; the file's own Q4_1 (quantized activations) drifts
    assert llama_backend.gguf.name.endswith("-float16.gguf") and llama_backend.source_gguf != llama_backend.gguf
    assert llama_backend.runtime == "llama.cpp, float16 copy of the GGUF"  # what the sidebar and CLI show
    refs = reference_continuations(small_backend)
    assert top1_agreement(llama_backend, refs) == 1.0
    text, done = text_of(llama_backend.stream(FRANCE, GenerationOptions(temperature=0, max_new_tokens=12)))
    ref_text, _ = text_of(small_backend.stream(FRANCE, GenerationOptions(temperature=0, max_new_tokens=12)))
    assert text == ref_text == "The capital of France is Paris." and done.usage.prompt_tokens == 37
    bf16 = llamacpp.LlamaCppBackend.from_settings(small_settings.model_copy(update={"gguf_weights": "bfloat16"}))
    try:
        assert bf16.gguf.name.endswith("-bfloat16.gguf")
        assert top1_agreement(bf16, refs) >= 0.95
    finally:
        bf16.close()


@needs_llamacpp
def test_native_weights_and_the_conversion_cache(small_settings, monkeypatch, tmp_path):
    native = llamacpp.LlamaCppBackend.from_settings(small_settings.model_copy(update={"gguf_weights": "native"}))
    try:
        assert native.gguf == native.source_gguf and native.gguf.suffix == ".gguf"
        # decoding the file's own Q4_1 weights is what segfaulted on AMX CPUs (repacked buffers):
        # on such a machine this is the regression test, elsewhere it checks native decoding works
        text, done = text_of(native.stream(FRANCE, GenerationOptions(temperature=0, max_new_tokens=8)))
        assert done.usage.completion_tokens == 8 and text.strip()
    finally:
        native.close()
    converted = llamacpp.compute_file(native.source_gguf, small_settings)
    stamp = converted.stat().st_mtime_ns
    assert llamacpp.compute_file(native.source_gguf, small_settings) == converted
    assert converted.stat().st_mtime_ns == stamp, "converted once, then reused"
    # a cache that can't be written: "auto" runs the file's own weights (with a warning), an explicit
    # mode says why it can't
    def fail(*a):
        raise OSError("read-only file system")

    monkeypatch.setattr(llamacpp, "_convert", fail)
    fresh = small_settings.model_copy(update={"cache_dir": tmp_path / "ro-cache"})
    assert llamacpp.compute_file(native.source_gguf, fresh) == native.source_gguf
    with pytest.raises(ConfigError, match="read-only file system"):
        llamacpp.compute_file(native.source_gguf, fresh.model_copy(update={"gguf_weights": "bfloat16"}))
    # an unquantized GGUF is computed with as it is
    assert llamacpp.compute_file(converted, small_settings.model_copy(update={"gguf_weights": "bfloat16"})) == converted


@needs_llamacpp
def test_same_prompt_ids_as_transformers_and_tokens_as_llama_cpp_itself(llama_backend, small_backend):
    from llama_cpp import Llama

    q = [Message(Role.USER, "Write a haiku about the sea.")]
    ids = llama_backend.prompt_ids(q)
    assert ids == small_backend.prompt_ids(q)
    dec = llama_backend.begin(q, GenerationOptions(temperature=0, max_new_tokens=30))
    list(llamacpp_run(llama_backend, dec))
    ref = Llama(model_path=str(llama_backend.gguf), n_ctx=512, n_threads=llama_backend.n_threads, verbose=False,
                flash_attn=True)  # as our context computes (llama.cpp's "auto" on this CPU)
    theirs = []
    for tok in ref.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if tok in llama_backend.format.stop_token_ids or len(theirs) == 30:
            break
        theirs.append(tok)
    assert dec.generated == theirs


SPLIT_SAMPLES = [
    "I'd pick the following:\n\n1. The harbour at dawn.\n2. The old mill.\n\n3) Dinner at 7:30pm, 2024-05-01.",
    "a  b   c\n\n\nd\t\te 12345678 x1y22z333 3.14159 1,000,000 $42.50 50% \n 9",
    "def f(x):\n    return x**2  # 10 spaces    then 99\n\n\n\nprint(f(12))",
    "Hello world!\n\nBye 'twas don't we'll I'm you're THEY'VE",
    "中文 123 测试，日本語のテキスト 456 ½ ② ٣ 🙂 ünïcödé café",
]


@needs_llamacpp
def test_gguf_tokenizers_split_text_as_llama_cpp_does(llama_backend, small_backend):
    """Both backends' tokenizers (read from the GGUF by transformers) give llama.cpp's own tokens: the
    embedded model's "smollm" split cuts digits off first (models.gguf_split); transformers' GGUF
    reader used GPT-2's, and "following:\\n\\n1." came out as two newline tokens instead of one."""
    from llama_cpp import Llama

    ref = Llama(model_path=str(llama_backend.gguf), vocab_only=True, verbose=False)
    for text in SPLIT_SAMPLES:
        theirs = ref.tokenize(text.encode(), add_bos=False, special=False)
        assert llama_backend.tokenizer.encode(text, add_special_tokens=False) == theirs, text
        assert small_backend.tokenizer.encode(text, add_special_tokens=False) == theirs, text
    assert ref.tokenize(b"following:\n\n1.", add_bos=False, special=False).count(198) == 0


def test_the_split_type_is_read_once_per_folder_and_a_read_only_one_still_loads(tmp_path, monkeypatch, caplog):
    from transformers import AutoTokenizer

    from chatglm_core.models import gguf_split
    from chatglm_core.models.loader import embedded_gguf

    tok = AutoTokenizer.from_pretrained(embedded_gguf().parent, gguf_file=embedded_gguf().name)
    assert tok.encode("x:\n\n1", add_special_tokens=False).count(198) == 2  # transformers' own reading
    assert not gguf_split.fix_split(tok, "llama-bpe") and not gguf_split.fix_split(tok, None)
    tok.save_pretrained(tmp_path / "tok")
    reads = []
    monkeypatch.setattr(gguf_split, "pre_type", lambda gguf: reads.append(gguf) or "smollm")
    for _ in range(2):
        fixed = gguf_split.load(tmp_path / "tok", embedded_gguf())
        assert fixed.encode("x:\n\n1", add_special_tokens=False).count(198) == 0
    assert len(reads) == 1  # the marker spares the ~2 s read next time
    (tmp_path / "tok" / gguf_split.MARKER).unlink()
    (tmp_path / "tok" / gguf_split.MARKER).mkdir()  # unwritable, as in a read-only cache
    with caplog.at_level("WARNING"):
        fixed = gguf_split.load(tmp_path / "tok", embedded_gguf())
    assert fixed.encode("x:\n\n1", add_special_tokens=False).count(198) == 0
    assert len(reads) == 2 and "at each start" in caplog.text


AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16
"""
SAPPHIRE_RAPIDS_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""


def test_extra_buffers_are_off_on_amx_cpus_unless_forced():
    amd, spr = llamacpp.cpu_flags(AMD_CPUINFO), llamacpp.cpu_flags(SAPPHIRE_RAPIDS_CPUINFO)
    assert "avx512_vnni" in amd and "amx_int8" in spr
    assert llamacpp.cpu_flags("processor: 0\n") == set()  # no flags line (not x86): nothing to avoid
    assert llamacpp.use_extra_buffers("auto", amd) is True
    assert llamacpp.use_extra_buffers("auto", spr) is False
    assert llamacpp.use_extra_buffers("auto", set()) is True
    assert llamacpp.use_extra_buffers("on", spr) is True
    assert llamacpp.use_extra_buffers("off", amd) is False


def record_params(monkeypatch, function: str, field: str) -> list:
    """The `field` of the params each call of llama_cpp.<function> gets (the call still runs)."""
    import llama_cpp

    seen, real = [], getattr(llama_cpp, function)

    def spy(first, params):
        seen.append(getattr(params, field))
        return real(first, params)

    monkeypatch.setattr(llama_cpp, function, spy)
    return seen


@needs_llamacpp
@pytest.mark.parametrize(("cpuinfo", "mode", "expected"), [
    (SAPPHIRE_RAPIDS_CPUINFO, "auto", False), (AMD_CPUINFO, "auto", True),
    (AMD_CPUINFO, "off", False), (SAPPHIRE_RAPIDS_CPUINFO, "on", True)])
def test_the_model_is_loaded_with_the_extra_buffer_choice(small_settings, monkeypatch, cpuinfo, mode, expected):
    """What llama.cpp itself receives: the model parameters' use_extra_bufts, as the CPU flags decide."""
    seen = record_params(monkeypatch, "llama_model_load_from_file", "use_extra_bufts")
    real_flags = llamacpp.cpu_flags
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda text=None: real_flags(cpuinfo))  # this machine as that CPU
    settings = small_settings.model_copy(update={"gguf_weights": "native", "llama_repack": mode})
    backend = llamacpp.LlamaCppBackend.from_settings(settings)
    try:
        assert seen and seen[-1] is expected and backend.extra_buffers is expected
    finally:
        backend.close()


@needs_llamacpp
@pytest.mark.parametrize(("mode", "expected"), [("auto", "AUTO"), ("on", "ENABLED"), ("off", "DISABLED")])
def test_the_context_gets_the_flash_attention_setting(small_settings, monkeypatch, mode, expected):
    """CHATGLM_LLAMA_FLASH_ATTN reaches llama.cpp's context parameters (llama-server's -fa), and a
    context without it still decodes."""
    import llama_cpp

    seen = record_params(monkeypatch, "llama_init_from_model", "flash_attn_type")
    backend = llamacpp.LlamaCppBackend.from_settings(small_settings.model_copy(update={"llama_flash_attn": mode}))
    try:
        assert seen == [getattr(llama_cpp, f"LLAMA_FLASH_ATTN_TYPE_{expected}")]
        done = Engine(backend).complete([Message(Role.USER, "Hi")], GenerationOptions(temperature=0, max_new_tokens=3))
        assert done.usage.completion_tokens >= 1
    finally:
        backend.close()


@needs_llamacpp
def test_weights_read_into_memory_or_mapped_give_the_same_logits(small_settings, monkeypatch):
    """CHATGLM_LLAMA_LOAD reaches llama.cpp's model parameters ("read": LLAMA_LOAD_MODE_NONE, "mmap":
    the file mapped, llama-server's default), and both compute the very same logits."""
    import llama_cpp
    import numpy as np

    seen = record_params(monkeypatch, "llama_model_load_from_file", "load_mode")
    rows = {}
    for mode in ("read", "mmap"):
        backend = llamacpp.LlamaCppBackend.from_settings(small_settings.model_copy(update={"llama_load": mode}))
        try:
            assert backend.load == mode
            ids = backend.prompt_ids([Message(Role.USER, "Name a colour.")])
            rows[mode] = [row.numpy() for row in backend.teacher_forced_logits(ids, len(ids) - 3)]
        finally:
            backend.close()
    assert seen == [llama_cpp.LLAMA_LOAD_MODE_NONE, llama_cpp.LLAMA_LOAD_MODE_MMAP]
    assert all(np.array_equal(a, b) for a, b in zip(rows["read"], rows["mmap"], strict=True))


def _thp_collapse_expected() -> bool:
    """Linux 6.1+ with transparent huge pages not "never": MADV_COLLAPSE should work."""
    import platform
    import re
    import sys

    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    return sys.platform == "linux" and "[never]" not in mode and match is not None and \
        (int(match[1]), int(match[2])) >= (6, 1)


@needs_llamacpp
def test_weights_read_into_memory_go_on_huge_pages_where_linux_allows(small_settings):
    """CHATGLM_LLAMA_HUGEPAGES=auto collapses the weights read into memory into 2 MiB pages (the process's
    AnonHugePages grow by as much); "off", or weights mapped from the file, leave the pages alone."""
    def anon_huge_kib() -> int:
        try:
            with open("/proc/self/smaps_rollup") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
        except (OSError, StopIteration):
            return 0

    for load, pages, collapses in (("read", "auto", _thp_collapse_expected()), ("read", "off", False),
                                   ("mmap", "auto", False)):
        before = anon_huge_kib()
        backend = llamacpp.LlamaCppBackend.from_settings(
            small_settings.model_copy(update={"llama_load": load, "llama_hugepages": pages}))
        try:
            if collapses:  # the float16 SmolLM2: ~256 MiB of weights
                assert backend.huge_page_bytes >= 200 << 20, (load, pages)
                assert anon_huge_kib() - before >= backend.huge_page_bytes >> 10
            else:
                assert backend.huge_page_bytes == 0, (load, pages)
            done = Engine(backend).complete([Message(Role.USER, "Hi")], GenerationOptions(temperature=0, max_new_tokens=3))
            assert done.usage.completion_tokens >= 1
        finally:
            backend.close()


@pytest.mark.skipif(not _thp_collapse_expected(), reason="needs Linux 6.1+ (MADV_COLLAPSE) with THP not 'never'")
def test_a_refused_region_does_not_undo_the_others():
    """A region the kernel refuses (here: not mapped at all, and first in address order) is passed over;
    before, it made use_huge_pages report 0 for regions it had not even tried."""
    import ctypes
    import mmap

    size = 8 * llamacpp.HUGE_PAGE
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        area.write(b"x" * size)  # fault every page in
        start = ctypes.addressof(ctypes.c_char.from_buffer(area))
        unmapped = (llamacpp.HUGE_PAGE, 2 * llamacpp.HUGE_PAGE)  # the lowest 2-4 MiB: never mapped
        moved = llamacpp.use_huge_pages({unmapped, (start, start + size)})
        assert moved >= size - 2 * llamacpp.HUGE_PAGE  # all but the unaligned ends of the good region
    finally:
        area.close()


def test_auto_reads_a_file_that_fits_in_half_the_available_memory(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 1000)
    assert llamacpp.load_mode("auto", gguf, available=2000) == "read"
    assert llamacpp.load_mode("auto", gguf, available=1999) == "mmap"  # a big file stays shared and pageable
    assert llamacpp.load_mode("auto", gguf, available=0) == "mmap"  # memory unknown (not Linux)
    assert llamacpp.load_mode("auto", tmp_path / "missing.gguf", available=10**9) == "mmap"
    assert llamacpp.load_mode("read", gguf, available=0) == "read"
    assert llamacpp.load_mode("mmap", gguf, available=10**9) == "mmap"


def llamacpp_run(backend, dec):
    from chatglm_core.backends.decoding import run_rows

    return run_rows(backend.open_rows(1), dec, None)


class RowsSpy:
    """Records, per sequence, the tokens llama.cpp was fed and the logits the engine got back, and
    per step how many rows decoded and how many prompt tokens were fed with them."""

    def __init__(self, monkeypatch) -> None:
        self.fed: dict[tuple[int, int], list[int]] = {}  # (rows, slot) -> prompt ids + every token stepped
        self.seen: dict[tuple[int, int], list] = {}  # (rows, slot) -> the logits the engine got for it
        self.steps: list[tuple[int, int]] = []  # (rows decoding, prompt tokens fed)
        add, step = llamacpp.LlamaRows.add, llamacpp.LlamaRows.step

        def spy_add(rows, ids):
            slot, logits = add(rows, ids)  # None: a long prompt, prefilled by the following steps
            self.fed[id(rows), slot] = list(ids)
            self.seen[id(rows), slot] = [] if logits is None else [torch.tensor(logits)]
            return slot, logits

        def spy_step(rows, tokens, pick=None):
            before = {s: rows.pos[s] for s in rows.prompts}
            got = {}

            def record(slot, logits):  # a copy, taken before the engine's sampler changes them in place
                got[slot] = torch.tensor(logits)
                return logits.copy() if pick is None else pick(slot, logits)

            out = step(rows, tokens, pick=record)
            self.steps.append((len(tokens), sum(rows.pos[s] - p for s, p in before.items())))
            for slot in out:  # a row's first logits come from the step finishing its prompt
                if slot in tokens:
                    self.fed[id(rows), slot].append(tokens[slot])
                self.seen[id(rows), slot].append(got[slot])
            return out

        monkeypatch.setattr(llamacpp.LlamaRows, "add", spy_add)
        monkeypatch.setattr(llamacpp.LlamaRows, "step", spy_step)

    def worst_logit_gap(self, backend) -> float:
        """The largest difference between a logit the engine got and the one the same sequence gets
        alone (teacher-forced through one sequence)."""
        worst = 0.0
        for key, ids in self.fed.items():
            alone = backend.teacher_forced_logits(ids, len(ids) - len(self.seen[key]))
            assert len(alone) == len(self.seen[key])
            worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(alone, self.seen[key], strict=True)))
        return worst


@needs_llamacpp
def test_eight_batched_callers_get_their_single_stream_logits(llama_backend, monkeypatch):
    """Eight callers share batched llama.cpp steps; each row's logits are the ones its sequence gets
    alone (teacher-forced, one sequence), up to float noise.

    Not "the same text": llama.cpp's float16 kernels differ in their last bits between a one-token and
    a many-token step, which flips greedy choices at near-ties (on one CI machine " shade" 16.159 vs
    " pigment" 16.156 after "a rare and precious"). Measured here: batching moves a logit by at most
    0.06 (a probability by 0.004); a row read one position off moves one by ~48.
    """
    spy = RowsSpy(monkeypatch)
    opts = GenerationOptions(temperature=0, max_new_tokens=24)
    got = concurrently(Engine(llama_backend), [([Message(Role.USER, p)], opts, {}) for p in EIGHT])
    monkeypatch.undo()
    assert all(text and done.finish_reason in ("stop", "length") for text, done in got)
    assert len(spy.seen) == 8 and not llama_backend.seqs.busy, "every row gave its sequence back"
    worst = spy.worst_logit_gap(llama_backend)
    assert worst < 1.0, f"batched logits moved by {worst} from the single-sequence ones"


@needs_llamacpp
def test_a_step_reaches_llama_cpp_in_sequence_order_and_logits_come_back_in_the_callers(llama_backend, monkeypatch):
    """Rows in any order (the engine's follows arrivals) are decoded in increasing sequence order (out
    of order, llama.cpp splits the step into several micro-batches: up to 3x slower), and each
    caller still gets its own row's logits."""
    prompts = [llama_backend.prompt_ids([Message(Role.USER, q)]) for q in ("Hi", "Name a colour.", "Count to 3.")]
    seqs = [llama_backend.seqs.acquire(ids, reuse=False)[0] for ids in prompts]
    try:
        for ids, seq in zip(prompts, seqs, strict=True):
            llama_backend.run([(t, p, seq, False) for p, t in enumerate(ids[:-1])])
        step = [(ids[-1], len(ids) - 1, seq, True) for ids, seq in zip(prompts, seqs, strict=True)][::-1]
        alone = []
        for item in step:  # each row decoded by itself, then the token taken back out
            alone.append(llama_backend.run([item])[0])
            llama_backend.seq_rm(item[2], item[1], -1)
        import llama_cpp

        decoded, real = [], llama_cpp.llama_decode

        def spy(ctx, batch):
            decoded.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
            return real(ctx, batch)

        monkeypatch.setattr(llama_cpp, "llama_decode", spy)
        together = llama_backend.run(step)
        monkeypatch.undo()
        assert decoded == [sorted(seqs)]
        for a, b in zip(alone, together, strict=True):
            assert int(a.argmax()) == int(b.argmax()) and float(abs(a - b).max()) < 1.0
    finally:
        for seq in seqs:
            llama_backend.seqs.release(seq, keep=False)


@needs_llamacpp
def test_a_long_prompt_joins_in_chunks_while_others_stream(llama_backend, monkeypatch):
    """A prompt longer than prefill_chunk is fed a chunk per step beside the running row's token, so
    that row keeps getting tokens during the prefill instead of waiting for all of it."""
    monkeypatch.setattr(llama_backend, "prefill_chunk", 32)
    spy = RowsSpy(monkeypatch)
    engine = Engine(llama_backend)
    long_question = "Summarize: " + "The committee met on Tuesday to discuss the budget and the new park. " * 12
    streaming = engine.stream([Message(Role.USER, "Count from one to fifty in words.")],
                              GenerationOptions(temperature=0, max_new_tokens=60))
    next(streaming)  # the first row is decoding
    text, done = text_of(engine.stream([Message(Role.USER, long_question)],
                                       GenerationOptions(temperature=0, max_new_tokens=8)))
    rest = "".join(ev.text for ev in streaming if isinstance(ev, TextDelta))
    monkeypatch.undo()
    assert text and rest and done.usage.prompt_tokens > 4 * 32
    beside = [fed for rows, fed in spy.steps if fed and rows]  # prompt tokens fed in steps that also decoded
    assert sum(beside) == done.usage.prompt_tokens - done.usage.cached_tokens, spy.steps
    assert max(beside) == 32 and len(beside) >= 4, spy.steps
    worst = spy.worst_logit_gap(llama_backend)
    assert worst < 1.0, f"logits moved by {worst} from the single-sequence ones"


@needs_llamacpp
def test_a_row_removed_mid_prefill_frees_its_sequence(llama_backend, monkeypatch):
    monkeypatch.setattr(llama_backend, "prefill_chunk", 16)
    llama_backend.clear_prefix_cache()  # the prompts below are fed from position 0
    rows = llama_backend.open_rows(2)
    ids = llama_backend.prompt_ids([Message(Role.USER, "Tell me about the sea. " * 20)])
    busy, first = rows.add(llama_backend.prompt_ids(FRANCE))  # 37 tokens: longer than a chunk
    assert first is None and set(rows.step({})) == {busy}  # alone: a whole n_batch in one step
    short, first = rows.add(ids[:16])
    assert first is not None and short not in rows.prompts  # a prompt of a chunk or less: prefilled at once
    rows.remove(short)
    slot, _ = rows.add(ids)  # takes short's sequence over: its 16 tokens are cached
    assert rows.cached_tokens(slot) == 16 and rows.pos[slot] == 16
    assert set(rows.step({busy: 1})) == {busy} and rows.pos[slot] == 32  # beside a decoding row: 16 tokens
    rows.remove(slot)  # e.g. its caller cancelled
    assert slot not in rows.prompts and llama_backend.seqs.busy == {rows.seqs[busy]}
    assert set(rows.step({busy: 2})) == {busy}
    rows.remove(busy)
    assert not llama_backend.seqs.busy and llama_backend.seqs.idle() == 8


@needs_llamacpp
def test_cancel_stop_strings_and_seed(llama_backend):
    engine = Engine(llama_backend)
    cancel = threading.Event()
    n, done = 0, None
    for ev in engine.stream([Message(Role.USER, "Tell me a very long story.")],
                            GenerationOptions(temperature=0, max_new_tokens=400), cancel=cancel):
        n += 1
        if n == 3:
            cancel.set()
        done = ev
    assert done.finish_reason == "cancelled" and done.usage.completion_tokens <= 5
    whole, _ = text_of(engine.stream(FRANCE, GenerationOptions(temperature=0, max_new_tokens=40)))
    assert "Paris" in whole
    text, done = text_of(engine.stream(FRANCE, GenerationOptions(temperature=0, max_new_tokens=40, stop=["Paris"])))
    assert text == whole[:whole.index("Paris")] and done.finish_reason == "stop"
    sampled = GenerationOptions(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=1234, presence_penalty=0.5,
                                repetition_penalty=1.1)
    assert text_of(engine.stream(FRANCE, sampled))[0] == text_of(engine.stream(FRANCE, sampled))[0]


@needs_llamacpp
def test_constraint_processors_steer_llama_cpp(llama_backend, monkeypatch):
    """A constraint's logits processor (chatglm_core.constrain) is applied to llama.cpp's logits too."""
    tok = llama_backend.tokenizer
    allowed = [tok.convert_tokens_to_ids(d) for d in "0123456789"]

    def logits_processor(constraint, tokenizer, format_name):
        def only_digits(input_ids, scores):
            masked = scores.clone().fill_(float("-inf"))
            masked[:, allowed] = scores[:, allowed]
            return masked
        return only_digits

    monkeypatch.setitem(sys.modules, "chatglm_core.constrain", types.SimpleNamespace(logits_processor=logits_processor))
    opts = GenerationOptions(temperature=0, max_new_tokens=6, constraint=Constraint("json_object"))
    text, done = text_of(llama_backend.stream(FRANCE, opts))
    assert len(text) == 6 and text.isdigit() and done.finish_reason == "length"


def test_auto_picks_llama_cpp_for_gguf_on_cpu_when_installed(small_settings, monkeypatch):
    from chatglm_core.backends import load_backend
    from chatglm_core.backends.transformers_backend import TransformersBackend

    auto = small_settings.model_copy(update={"backend": "auto"})
    if llamacpp.available():
        backend = load_backend(auto)
        try:
            assert isinstance(backend, llamacpp.LlamaCppBackend)
        finally:
            backend.close()
    # without llama-cpp-python (or for 4-bit/8-bit transformers quantization) auto means transformers
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert isinstance(load_backend(auto), TransformersBackend)


def test_llama_cpp_needs_a_gguf_file(small_settings, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    settings = small_settings.model_copy(update={"backend": "llamacpp", "model_path": str(tmp_path)})
    if not llamacpp.available():
        with pytest.raises(ConfigError, match="requirements-llamacpp.txt"):
            llamacpp.LlamaCppBackend.from_settings(settings)
    else:
        with pytest.raises(ConfigError, match="runs .gguf files"):
            llamacpp.LlamaCppBackend.from_settings(settings)


@needs_llamacpp
def test_a_next_turn_starts_from_the_cached_prefix_and_replies_as_cold(llama_backend, monkeypatch):
    """llama.cpp: turn N+1's prompt begins with turn N's prompt and reply, so the finished row's
    sequence is taken over and only the new part is fed (usage.cached_tokens). The greedy replies
    are the ones the same chat gets with no cache, also when eight other chats between turns 2 and 3
    evict its entry (each starts from a copy of the shared system prompt)."""
    from test_engine import conversation

    opts = GenerationOptions(temperature=0, max_new_tokens=24)
    llama_backend.clear_prefix_cache()
    monkeypatch.setattr(llama_backend.seqs, "caching", False)
    cold = conversation(Engine(llama_backend), opts)
    monkeypatch.setattr(llama_backend.seqs, "caching", True)
    warm = conversation(Engine(llama_backend), opts, others=EIGHT)
    assert [t for t, _ in warm] == [t for t, _ in cold] and all(t for t, _ in cold)
    assert [d.usage.cached_tokens for _, d in cold] == [0, 0, 0]
    first, second, third = (d.usage for _, d in warm)
    assert first.cached_tokens == 0
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens - 1  # the last token was never fed
    assert 0 < third.cached_tokens < first.prompt_tokens  # only the system prompt was left to share
    assert not llama_backend.seqs.busy and len(llama_backend.seqs.cache) == 8


@needs_llamacpp
def test_a_copied_prefix_survives_its_entry_being_evicted_before_the_copy(llama_backend, monkeypatch):
    """A prompt that diverges inside a cached entry gets a copy of its cells (llama.cpp performs the
    copy at the next decode). Another row evicts the entry and decodes into its sequence before that:
    the copy still holds the shared prefix, and the row's first logits are its prompt's fed whole."""
    monkeypatch.setattr(llama_backend, "prefill_chunk", 8)
    llama_backend.clear_prefix_cache()
    system = Message(Role.SYSTEM, "You are a careful assistant who answers in plain words. " * 4)
    a = llama_backend.prompt_ids([system, Message(Role.USER, "Name a colour.")])
    b = llama_backend.prompt_ids([system, Message(Role.USER, "Describe the sea at night in a few words.")])
    rows = llama_backend.open_rows(8)
    slot = rows.add(a)[0]
    while slot not in rows.step({}):
        pass
    entry = rows.seqs[slot]
    rows.remove(slot)
    busy = [rows.add([1, 2, 3, 4 + i])[0] for i in range(6)]  # short prompts: decoded at once
    slot_b, first = rows.add(b)
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert first is None and rows.cached_tokens(slot_b) == shared > 16 and entry in llama_backend.seqs.cache
    busy.append(rows.add([5, 6, 7])[0])  # no sequence is free: the entry is evicted, its cells reused
    assert rows.seqs[busy[-1]] == entry and not llama_backend.seqs.cache
    while (got := rows.step({}).get(slot_b)) is None:
        pass
    for s in busy:
        rows.remove(s)
    (cold,) = llama_backend.teacher_forced_logits(b, len(b) - 1)
    assert float((torch.from_numpy(got) - cold).abs().max()) < 1.0
    rows.remove(slot_b)

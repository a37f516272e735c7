"""One request's decoding state, shared by every local backend and by the engine's batch loop.

A local backend only has to turn token ids into next-token logits (`Rows`: prefill a sequence,
then step all sequences one token at a time). Everything else about a request lives here: the
prompt's token budget, sampling with transformers' own logits processors (so greedy output equals
``model.generate``'s and every backend samples alike), stop tokens and stop strings, holding back
text that may still become a stop string or a tool-call opening, and the final `Done`.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.errors import ParseError, RequestError
from chatglm_core.formats.parsing import TOOL_CALL_OPEN
from chatglm_core.messages import Done, Message, Role, TextDelta, Usage


class Rows(Protocol):
    """Sequences decoded in lock-step: the part of a local backend that runs the model.

    Logits are the next-token scores of one sequence over the vocabulary: a 1-D float tensor, or a
    1-D float32 numpy array (llama.cpp's, which `Decoding.sample` may change in place).
    """

    #: How many sequences may be open at once.
    capacity: int

    def add(self, ids: list[int]) -> tuple[int, Any]:
        """Open a new sequence: (its slot, logits for its first generated token). The logits are None
        when the prompt is prefilled by the following steps instead (llama.cpp mixes it into them)."""
        ...

    def step(self, tokens: dict[int, int], pick: Any = None) -> dict[int, Any]:
        """Append one token to each listed slot (every slot that has had its logits); returns next
        logits per slot, plus the first logits of each slot whose prompt this step finished.

        With `pick`, a slot's value is `pick(slot, logits)` instead, called while those logits are
        valid: llama.cpp's are its own buffer then (no copy), which pick may change in place but must
        not keep. The engine samples there."""
        ...

    def remove(self, slot: int) -> None:
        """Forget a finished sequence and free its memory (a backend may keep its KV as a prefix
        cache entry for later prompts that start the same way)."""
        ...

    def cached_tokens(self, slot: int) -> int:
        """How many of the slot's prompt tokens `add` took from the prefix cache."""
        ...


class LocalBackend:
    """What every local backend shares: prompt ids from the format, a `Decoding` per request, and
    `stream` as a loop over one row of `open_rows`. Subclasses set `format`, `tokenizer`,
    `context_window`, `model_name`, `device` and implement `open_rows(capacity) -> Rows`.
    """

    format: Any
    tokenizer: Any
    context_window: int | None
    device: str
    #: a longer prompt joins a running batch this many tokens a step (settings.prefill_chunk; None: by device)
    prefill_chunk: int | None = None

    def open_rows(self, capacity: int) -> Rows:
        raise NotImplementedError

    def rows_prefill_chunk(self) -> int:
        """prefill_chunk, else 128 tokens on the CPU and 512 on a GPU."""
        return self.prefill_chunk or (128 if str(self.device).startswith("cpu") else 512)

    def prompt_ids(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                   interpreter: bool = False) -> list[int]:
        if interpreter and messages and messages[0].role is not Role.SYSTEM:
            prompt = getattr(self.format, "interpreter_prompt", None)
            if prompt:
                messages = [Message(Role.SYSTEM, prompt), *messages]
        return self.format.encode(messages, tools)

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> int:
        return len(self.prompt_ids(messages, tools))

    def begin(self, messages: list[Message], options: GenerationOptions, *,
              tools: list[dict[str, Any]] | None = None, interpreter: bool = False) -> Decoding:
        """The decoding state of one request (raises RequestError for a prompt that doesn't fit)."""
        check_prompt_chars(messages, tools, self.context_window, self.max_token_chars())
        ids = self.prompt_ids(messages, tools, interpreter)
        return Decoding(ids, options, max_new=token_budget(len(ids), options, self.context_window),
                        stop_token_ids=self.format.stop_token_ids, decode=self.reply_decoder(), parse=self.format.parse,
                        processors=build_processors(options, self.tokenizer, self.format.name),
                        tools=bool(tools), interpreter=interpreter)

    def stream(self, messages: list[Message], options: GenerationOptions, *, tools: list[dict[str, Any]] | None = None,
               interpreter: bool = False, cancel: threading.Event | None = None) -> Iterator[TextDelta | Done]:
        dec = self.begin(messages, options, tools=tools, interpreter=interpreter)
        yield from run_rows(self.open_rows(1), dec, cancel)

    def max_token_chars(self) -> int:
        """Characters of the vocabulary's longest token (byte-level tokens: its bytes), read once."""
        longest = getattr(self, "_max_token_chars", None)
        if longest is None:
            try:
                longest = max(map(len, self.tokenizer.get_vocab()), default=0) or FALLBACK_TOKEN_CHARS
            except (AttributeError, NotImplementedError, TypeError):  # a tokenizer that can't list its vocabulary
                longest = FALLBACK_TOKEN_CHARS
            self._max_token_chars = longest
        return longest

    def reply_decoder(self) -> Any:
        """A `decode` for one growing reply: incremental (a few tokens decoded per token) unless the
        format decodes replies itself (ChatGLM3 cuts its text at stop markers that span tokens)."""
        if getattr(self.format, "decode_reply", None) is not None:
            return self.decode
        tok = self.tokenizer
        rust = getattr(tok, "_tokenizer", None)  # a transformers fast tokenizer's `tokenizers.Tokenizer`
        if rust is not None and callable(getattr(rust, "decode", None)) and \
                getattr(tok, "clean_up_tokenization_spaces", None) is False:
            # what tokenizer.decode returns when there is no clean-up to do, without transformers'
            # wrapper around it (a quarter of the time: two of these run for every token)
            return IncrementalDecode(lambda ids: rust.decode(ids, skip_special_tokens=True), self._single_texts())
        return IncrementalDecode(lambda ids: tok.decode(ids, skip_special_tokens=True), self._single_texts())

    def _single_texts(self) -> dict[int, str]:
        """The replies' shared decode([id]) by id (one tokenizer per backend, so one table)."""
        table = getattr(self, "_singles", None)
        if table is None:
            table = self._singles = {}
        return table

    def decode(self, ids: list[int]) -> str:
        """Generated ids → text; a format may keep markers its parser needs (ChatGLM3's segments)."""
        decode_reply = getattr(self.format, "decode_reply", None)
        if decode_reply is not None:
            return decode_reply(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Decoding:
    """Sampling and text assembly of one generation, fed one token at a time."""

    def __init__(self, prompt_ids: list[int], options: GenerationOptions, *, max_new: int, stop_token_ids: Any,
                 decode: Any, parse: Any, processors: Any, tools: bool, interpreter: bool) -> None:
        import torch

        self.prompt_ids = prompt_ids
        self.options = options
        self.max_new = max_new
        self.stop_token_ids = frozenset(stop_token_ids)
        self._decode, self._parse = decode, parse
        self.processors = processors
        self.tools, self.interpreter = tools, interpreter
        self.generator = torch.Generator(device="cpu").manual_seed(options.seed) if options.seed is not None else None
        # the numpy path's uniform numbers: Python's (a torch call cost ~0.09 ms there), seeded per request
        self._uniform = random.Random(options.seed).random if options.seed is not None else random.random
        self.text = TextAssembler(options.stop, hold=[TOOL_CALL_OPEN] if tools else [])
        self._all_ids: Any = None  # all_ids, made when a torch processor first reads it
        # numpy logits (llama.cpp's) are sampled in numpy when nothing but a repetition penalty and the
        # temperature stands before the draw (no constraint, OpenAI penalties or top_k: those run on torch)
        self._penalty = next((p for p in processors if isinstance(p, RepetitionPenalty)), None)
        self._numpy = not processors
        if processors:
            from transformers import TemperatureLogitsWarper

            self._numpy = all(isinstance(p, RepetitionPenalty | TemperatureLogitsWarper) for p in processors)
        self.generated: list[int] = []
        self.sampled = 0
        self.cached_tokens = 0  # prompt tokens the backend reused from its prefix cache
        self.finish_reason = "length"

    @property
    def all_ids(self) -> Any:
        """The prompt and the reply so far as a 1 x n tensor (what transformers' processors read), extended
        when asked for: the numpy path never needs it."""
        import torch

        if self._all_ids is None:
            self._all_ids = torch.tensor([list(self.prompt_ids) + self.generated])
        have = self._all_ids.shape[1] - len(self.prompt_ids)
        if have < len(self.generated):
            self._all_ids = torch.cat([self._all_ids, torch.tensor([self.generated[have:]])], dim=-1)
        return self._all_ids

    def sample(self, logits: Any) -> int:
        """The next token from this sequence's logits (1-D: a torch tensor, or a float32 numpy array from
        llama.cpp, which may be changed in place), after penalties, constraints and warpers."""
        if isinstance(logits, np.ndarray) and self._numpy:
            # The same numbers as the torch path in a few numpy calls: right after a decode has
            # streamed the weights through the caches, each torch call here ran cold (penalty plus
            # argmax ~0.35 ms a token against ~0.08 ms; a sampled token's extra work ~0.7 ms, a 15th
            # of a step on 2 cores).
            if self.options.greedy:
                if self._penalty is not None:
                    return self._penalty.greedy(logits, self.prompt_ids, self.generated)
                return int(logits.argmax())
            if self._penalty is not None:
                self._penalty.penalize(logits, self.prompt_ids, self.generated)
            return sample_array(logits, self.options.temperature, self.options.top_p, self._uniform)
        import torch

        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        scores = logits.float().reshape(1, -1)
        for processor in self.processors:  # not LogitsProcessorList(): it inspects every signature per call
            scores = processor(self.all_ids, scores)
        if self.options.greedy:
            return int(scores.argmax(-1))
        return sample_token(scores.cpu(), self.options.top_p, self.generator)

    def accept(self, token: int) -> tuple[list[TextDelta], bool]:
        """Take a sampled token: (text deltas it releases, whether the generation is over)."""
        self.sampled += 1
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
            return [], True
        self.generated.append(token)
        delta, stopped = self.text.feed(self._decode(self.generated))
        if stopped:
            self.finish_reason = "stop"
        out = [TextDelta(delta)] if delta else []
        return out, stopped or self.sampled >= self.max_new

    def finish(self, reason: str | None = None) -> list[TextDelta | Done]:
        """The held-back tail (if any) and the Done; `reason` overrides, e.g. "cancelled"."""
        finish = reason or self.finish_reason
        out: list[TextDelta | Done] = []
        tail = self.text.flush()
        if tail:
            out.append(TextDelta(tail))
        usage = Usage(len(self.prompt_ids), self.sampled, self.cached_tokens)
        text = self.text.text
        try:
            message = self._parse(text, tools=self.tools, interpreter=self.interpreter)
        except ParseError as e:
            out.append(Done(Message(Role.ASSISTANT, text.strip()), finish, usage, raw_text=text, parse_error=str(e)))
            return out
        if message.tool_calls and finish != "cancelled":
            finish = "tool_calls"
        out.append(Done(message, finish, usage, raw_text=text))
        return out


#: The longest token assumed for a tokenizer that can't list its vocabulary (tokens are rarely over 32).
FALLBACK_TOKEN_CHARS = 128


def prompt_chars(messages: list[Message], tools: list[dict[str, Any]] | None) -> int:
    """Characters the prompt renders at least: the messages' text, their calls' and the tools' JSON."""
    def compact(value: Any) -> int:
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    n = sum(len(m.content) + sum(compact(c.arguments) for c in m.tool_calls) for m in messages)
    return n + (compact(tools) if tools else 0)


def check_prompt_chars(messages: list[Message], tools: list[dict[str, Any]] | None, context_window: int | None,
                       max_token_chars: int) -> None:
    """Refuse, before tokenizing it, a prompt that cannot fit the context window: no token spans more
    than `max_token_chars` characters, so more characters than the window times that cannot be fewer
    tokens than the window (tokenizing 10 M tokens would take the caller's thread ~40 s)."""
    if not context_window:
        return
    chars, most = prompt_chars(messages, tools), context_window * max_token_chars
    if chars > most:
        raise RequestError(
            f"the prompt is {chars:,} characters, more than the model's context window of {context_window} tokens "
            f"can hold (at most {most:,} characters at {max_token_chars} per token): shorten the conversation",
            param="messages", code="context_length_exceeded")


def token_budget(prompt_len: int, options: GenerationOptions, context_window: int | None) -> int:
    """max_new_tokens cut to the room left in the context window; RequestError when there is none."""
    max_new = options.max_new_tokens
    if max_new < 1:
        raise RequestError(f"max_new_tokens is {max_new}: it must be at least 1", param="max_tokens")
    if context_window:
        room = context_window - prompt_len
        if room <= 0:
            raise RequestError(
                f"the prompt is {prompt_len} tokens, longer than the model's context window of "
                f"{context_window}: shorten the conversation", param="messages", code="context_length_exceeded")
        max_new = min(max_new, room)
    return max_new


def build_processors(options: GenerationOptions, tokenizer: Any, format_name: str) -> Any:
    """transformers logits processors for the options; an empty list for plain greedy decoding."""
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    procs = LogitsProcessorList()
    if options.constraint is not None:
        from chatglm_core.constrain import logits_processor

        procs.append(logits_processor(options.constraint, tokenizer, format_name))
    if options.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(options.repetition_penalty))
    if options.presence_penalty or options.frequency_penalty:
        procs.append(OpenAIPenalties(options.presence_penalty, options.frequency_penalty))
    if not options.greedy:
        procs.append(TemperatureLogitsWarper(options.temperature))
        if options.top_k:
            procs.append(TopKLogitsWarper(options.top_k))
        # top_p is applied by sample_token (the same nucleus as TopPLogitsWarper, without its full sort)
    return procs


def sample_token(scores: Any, top_p: float, generator: Any = None) -> int:
    """Draw a token from softmax(scores) (1 × vocab) restricted to its top_p nucleus.

    The draw is one uniform number against the cumulative probabilities instead of torch.multinomial,
    and the nucleus is found without sorting the whole vocabulary (`nucleus`): on SmolLM2's 49,152
    tokens ~0.2 ms instead of ~3.9 ms a token (TopPLogitsWarper's sort 3.1 ms, multinomial 0.8 ms),
    which was a third of a CPU decode step.
    """
    import torch

    probs = torch.softmax(scores.reshape(-1).float(), dim=-1)
    index = None
    if top_p < 1.0:
        probs, index = nucleus(probs, top_p)
    cumulative = torch.cumsum(probs, 0)
    u = torch.rand((), generator=generator) * cumulative[-1]
    i = min(int(torch.searchsorted(cumulative, u, right=True)), len(cumulative) - 1)
    return int(index[i]) if index is not None else i


def sample_array(scores: Any, temperature: float, top_p: float, uniform: Any) -> int:
    """`sample_token` after transformers' TemperatureLogitsWarper, on a 1-D float32 numpy array (turned
    into unnormalized probabilities in place: each temporary of the vocabulary's size cost a fresh
    allocation, and every call runs cold right after a decode). `uniform()` draws from [0, 1)."""
    if temperature != 1.0:
        scores /= np.float32(temperature)  # float32, as torch divides by the python float
    scores -= scores.max()
    probs = np.exp(scores, out=scores)
    ids = None
    if top_p < 1.0:
        probs, ids = nucleus_array(probs, top_p)
    cumulative = np.cumsum(probs)
    u = uniform() * float(cumulative[-1])
    i = min(int(np.searchsorted(cumulative, u, side="right")), len(cumulative) - 1)
    return int(ids[i]) if ids is not None else i


def nucleus_array(weights: Any, top_p: float) -> tuple[Any, Any]:
    """`nucleus` on a numpy array of probabilities up to a factor (exp of the scores): the tokens at or
    above a falling cut until they hold top_p of the mass (every token below the cut then has at least
    top_p above it, so none of them is in the nucleus), sorted; then the same rule, in float64."""
    total = float(weights.sum(dtype=np.float64))
    mass = top_p * total
    cut = float(weights.max()) * 1e-3
    while True:
        ids = np.flatnonzero(weights >= cut)
        kept = weights[ids]
        if cut == 0.0 or float(kept.sum(dtype=np.float64)) >= mass:
            break
        cut = cut * 1e-3 if cut > 1e-30 else 0.0
    order = np.argsort(-kept, kind="stable")
    ids, kept = ids[order], kept[order]
    above = (np.cumsum(kept, dtype=np.float64) - kept) / total
    keep = max(1, int((above < top_p).sum()))
    return kept[:keep], ids[:keep]


def nucleus(probs: Any, top_p: float) -> tuple[Any, Any]:
    """(probabilities, token ids) of the top_p nucleus, most likely first: what transformers'
    TopPLogitsWarper keeps (the most likely tokens while the mass above each is below top_p),
    found with a top-k of growing k rather than a sort of the whole vocabulary."""
    import torch

    n, k = probs.numel(), 64
    while True:
        k = min(k, n)
        top, idx = torch.topk(probs, k)  # sorted, most likely first
        above = torch.cumsum(top.double(), 0) - top  # float64: the tail's tiny probabilities still count
        if k == n or float(above[-1] + top[-1]) >= top_p:  # every token past these has top_p above it
            keep = max(1, int((above < top_p).sum()))
            return top[:keep], idx[:keep]
        k *= 8


def run_rows(rows: Rows, dec: Decoding, cancel: Any) -> Any:
    """A single generation over `rows`: the backends' own `stream` loop. Yields events."""
    slot = None
    try:
        if cancel is not None and cancel.is_set():
            yield from dec.finish("cancelled")
            return
        slot, logits = rows.add(dec.prompt_ids)
        dec.cached_tokens = rows.cached_tokens(slot)
        while logits is None:  # a prompt prefilled over steps (llama.cpp)
            if cancel is not None and cancel.is_set():
                yield from dec.finish("cancelled")
                return
            logits = rows.step({}).get(slot)
        token = dec.sample(logits)
        while True:
            deltas, over = dec.accept(token)
            yield from deltas
            if over:
                break
            if cancel is not None and cancel.is_set():
                yield from dec.finish("cancelled")
                return
            token = rows.step({slot: dec.generated[-1]}, pick=lambda _, logits: dec.sample(logits))[slot]
        yield from dec.finish()
    finally:
        if slot is not None:
            rows.remove(slot)


class RepetitionPenalty:
    """transformers' RepetitionPenaltyLogitsProcessor (every token id already in the prompt or the
    reply: its logit divided by the penalty, or multiplied when negative), kept incrementally.

    transformers' gathers and scatters over the whole history each token (duplicates included: 1.5k
    ids for a long chat) and copies the vocabulary's logits; this keeps the distinct ids seen so far,
    adds each new token to them, and changes those logits in place: a single stream through the API
    ran 4 % slower with the default penalty (1.05) than without it before, the same after. Called with
    the sequence's growing ids (`Decoding.all_ids`), as the transformers processor is; `penalize` and
    `greedy` do the same on numpy scores from the prompt and reply lists.
    """

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self._seen: set[int] = set()
        self._order: list[int] = []  # the distinct ids seen, in order
        self._ids: Any = None  # _order as a tensor / numpy array, rebuilt when it grows
        self._np: Any = None
        self._read = 0  # how many ids of the sequence have been looked at

    def _see(self, ids: list[int]) -> None:
        fresh = [t for t in dict.fromkeys(ids) if t not in self._seen]
        if fresh:
            self._seen.update(fresh)
            self._order += fresh
            self._ids = self._np = None

    def _catch_up(self, prompt: list[int], generated: list[int]) -> None:
        if len(prompt) + len(generated) > self._read:
            self._see(prompt[self._read:] + generated if self._read < len(prompt) else generated[self._read - len(prompt):])
            self._read = len(prompt) + len(generated)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        row = input_ids[0]
        if row.numel() > self._read:
            self._see(row[self._read:].tolist())
            self._read = row.numel()
        if not self._order:
            return scores
        if self._ids is None:
            self._ids = torch.tensor(self._order, dtype=torch.long)
        if scores.is_inference():  # transformers' logits, made under inference_mode: not writable here
            scores = scores.clone()
        picked = scores[0, self._ids]
        scores[0, self._ids] = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores

    def penalize(self, scores: Any, prompt: list[int], generated: list[int]) -> None:
        """The same on a 1-D float32 numpy array, in place, for the sequence prompt + generated (numpy
        casts the penalty to float32 as torch does, so the scores are equal)."""
        self._catch_up(prompt, generated)
        self._penalize_except(scores, ())

    def _penalize_except(self, scores: Any, done: Any) -> None:
        """Penalize the ids seen but those in `done` (a collection of ids already penalized)."""
        if not self._order:
            return
        if self._np is None:
            self._np = np.array(self._order, dtype=np.intp)
        ids = self._np[~np.isin(self._np, list(done))] if done else self._np
        picked = scores[ids]
        scores[ids] = np.where(picked < 0, picked * np.float32(self.penalty), picked / np.float32(self.penalty))

    def greedy(self, scores: Any, prompt: list[int], generated: list[int]) -> int:
        """argmax of the penalized numpy scores (which may be changed in place), the first maximum as
        argmax picks.

        A penalty above 1 only lowers the ids seen, so only those that beat the best unseen id matter:
        this penalizes the argmax while it is an id seen and not yet penalized, and argmaxes again.
        The answer is then the full penalty's: an id left alone scores no more penalized than raw,
        which is below the answer (or equal and later). Penalizing every id seen (hundreds: a
        gather, a where and a scatter) cost ~70 us a token right after a decode; this is an argmax
        or two. After a few rounds it penalizes all of them (a run of ids seen at the top)."""
        if self.penalty < 1.0:
            self.penalize(scores, prompt, generated)
            return int(scores.argmax())
        self._catch_up(prompt, generated)
        seen, done, penalty = self._seen, set(), np.float32(self.penalty)
        for _ in range(4):
            best = int(scores.argmax())
            if best not in seen or best in done:
                return best
            value = scores[best]  # a float32 scalar: the same rounding as the array's where()
            scores[best] = value * penalty if value < 0 else value / penalty
            done.add(best)
        self._penalize_except(scores, done)
        return int(scores.argmax())


class IncrementalDecode:
    """`decode(ids)` of a reply that grows a token at a time, decoding only its last few tokens.

    Decoding the whole reply every token cost ~0.2 ms at 128 tokens and ~1.6 ms at 512 here (a tenth
    of a CPU decode step). This keeps the text of the ids read so far and decodes the new ids together
    with the ones before them (`_prefix`), as text-generation-inference and vLLM do: a tokenizer that
    drops or adds a space at the start of what it decodes (SentencePiece) does so to both, and the
    difference is the new text. An incomplete UTF-8 character (U+FFFD at the end) stays pending until
    the token that completes it. Called with a list that only ever grows (`Decoding.generated`);
    anything else starts over with a whole decode.
    """

    def __init__(self, decode: Any, singles: dict[int, str] | None = None) -> None:
        self._decode = decode
        # decode([id]) by id, for the head of one token (most steps): a call less a token. Shared by the
        # replies of one decode function (LocalBackend.reply_decoder), so it fills to the words in use.
        self._singles = {} if singles is None else singles
        self._text = ""  # decode(ids[:_read])
        self._prefix = 0  # ids[_prefix:_read] are decoded again with each new token
        self._read = 0
        self._seen = 0

    def __call__(self, ids: list[int]) -> str:
        if len(ids) < self._seen:
            self.__init__(self._decode, self._singles)  # type: ignore[misc]
        self._seen = len(ids)
        if self._read - self._prefix == 1:
            head = self._singles.get(ids[self._prefix])
            if head is None:
                head = self._singles[ids[self._prefix]] = self._decode(ids[self._prefix:self._read])
        else:
            head = self._decode(ids[self._prefix:self._read]) if self._read > self._prefix else ""
        both = self._decode(ids[self._prefix:])
        if not both.startswith(head):  # the new tokens changed how the ones before them decode
            text = self._decode(ids)
            if not text.endswith("\ufffd"):
                self._text, self._prefix, self._read = text, max(0, len(ids) - 1), len(ids)
            return text
        new = both[len(head):]
        if new.endswith("\ufffd"):
            return self._text + new
        self._text += new
        self._prefix, self._read = self._read, len(ids)
        return self._text


class OpenAIPenalties:
    """OpenAI's presence/frequency penalties on the tokens generated so far."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency
        self.prompt_len: int | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        gen = input_ids[0, self.prompt_len:]
        if gen.numel() == 0:
            return scores
        counts = torch.bincount(gen, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class TextAssembler:
    """Turns the growing decoded text into deltas, honouring stop strings.

    Text that could still turn into a stop string (or a held marker such as `<tool_call>`) is held
    back until it can't; an incomplete UTF-8 character (U+FFFD at the end) is held too. Once a held
    marker appears, nothing more is emitted as text: the rest is a call, not prose.
    """

    def __init__(self, stop: list[str], hold: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.hold = hold
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.silenced = False

    def feed(self, text: str) -> tuple[str, bool]:
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                self.text, self.stopped = text[:i], True
                return self._emit(len(self.text)), True
        self.text = text
        if not self.silenced:
            for marker in self.hold:
                i = text.find(marker)
                if i >= 0:
                    out = self._emit(i)
                    self.silenced = True
                    return out, False
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop + self.hold:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe = min(safe, len(text[:safe]) - k)
                    break
        return self._emit(safe), False

    def _emit(self, upto: int) -> str:
        if self.silenced or upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    def flush(self) -> str:
        # the end of the reply: a held-back U+FFFD is what the tokenizer decodes there (ChatGLM3's own
        # decode keeps it too), so it is emitted and the streamed reply equals the whole one
        if self.silenced:
            return ""
        return self._emit(len(self.text))


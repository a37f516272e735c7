"""Local generation with a transformers model: our own token loop over the KV cache.

A hand-written loop (rather than ``model.generate`` on a helper thread) gives per-token control:
cancellation is checked between tokens, stop strings are matched on the decoded text, text that
might still become a stop string or a tool-call opening is held back, and every token is counted.
Sampling uses transformers' own logits processors, so greedy output equals ``model.generate``'s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.errors import ParseError, RequestError
from chatglm_core.formats.parsing import TOOL_CALL_OPEN
from chatglm_core.messages import Done, Message, Role, TextDelta, Usage


class TransformersBackend:
    def __init__(self, model: Any, tokenizer: Any, fmt: Any, *, model_name: str, device: str,
                 context_window: int | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = fmt
        self.model_name = model_name
        self.device = device
        self.context_window = context_window

    @classmethod
    def from_settings(cls, settings: Any) -> TransformersBackend:
        from chatglm_core.models.loader import load_model

        m = load_model(settings)
        return cls(m.model, m.tokenizer, m.format, model_name=m.name, device=m.device, context_window=m.context_window)

    # --- prompt -----------------------------------------------------------------------------
    def prompt_ids(self, messages: list[Message], tools: list[dict[str, Any]] | None = None,
                   interpreter: bool = False) -> list[int]:
        if interpreter and messages and messages[0].role is not Role.SYSTEM:
            prompt = getattr(self.format, "interpreter_prompt", None)
            if prompt:
                messages = [Message(Role.SYSTEM, prompt), *messages]
        return self.format.encode(messages, tools)

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> int:
        return len(self.prompt_ids(messages, tools))

    # --- generation -------------------------------------------------------------------------
    def stream(self, messages: list[Message], options: GenerationOptions, *, tools: list[dict[str, Any]] | None = None,
               interpreter: bool = False, cancel: threading.Event | None = None) -> Iterator[TextDelta | Done]:
        ids = self.prompt_ids(messages, tools, interpreter)
        max_new = options.max_new_tokens
        if self.context_window:
            room = self.context_window - len(ids)
            if room <= 0:
                raise RequestError(
                    f"the prompt is {len(ids)} tokens, longer than the model's context window of "
                    f"{self.context_window}: shorten the conversation", param="messages", code="context_length_exceeded")
            max_new = min(max_new, room)
        text_out = _TextAssembler(options.stop, hold=[TOOL_CALL_OPEN] if tools else [])
        generated: list[int] = []
        sampled = 0
        finish = "length"
        for token in self.tokens(ids, options, max_new, cancel):
            if token is None:
                finish = "cancelled"
                break
            sampled += 1
            if token in self.format.stop_token_ids:
                finish = "stop"
                break
            generated.append(token)
            delta, stopped = text_out.feed(self.decode(generated))
            if delta:
                yield TextDelta(delta)
            if stopped:
                finish = "stop"
                break
        tail = text_out.flush()
        if tail:
            yield TextDelta(tail)
        usage = Usage(len(ids), sampled)
        yield self._done(text_out.text, finish, usage, tools=bool(tools), interpreter=interpreter)

    def decode(self, ids: list[int]) -> str:
        """Generated ids → text; a format may keep markers its parser needs (ChatGLM3's segments)."""
        decode_reply = getattr(self.format, "decode_reply", None)
        if decode_reply is not None:
            return decode_reply(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _done(self, text: str, finish: str, usage: Usage, *, tools: bool, interpreter: bool) -> Done:
        try:
            message = self.format.parse(text, tools=tools, interpreter=interpreter)
        except ParseError as e:
            return Done(Message(Role.ASSISTANT, text.strip()), finish, usage, raw_text=text, parse_error=str(e))
        if message.tool_calls and finish != "cancelled":
            finish = "tool_calls"
        return Done(message, finish, usage, raw_text=text)

    def tokens(self, ids: list[int], options: GenerationOptions, max_new: int,
               cancel: threading.Event | None) -> Iterator[int | None]:
        """Sampled token ids one at a time; None once `cancel` is set."""
        import torch
        from transformers import DynamicCache

        processors = self._processors(options)
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(options.seed)
        device = self.model.device
        all_ids = torch.tensor([ids], device=device)
        step_ids = all_ids
        cache = DynamicCache()
        with torch.inference_mode():
            for _ in range(max_new):
                if cancel is not None and cancel.is_set():
                    yield None
                    return
                out = self.model(input_ids=step_ids, cache=cache, use_cache=True)
                cache = getattr(out, "cache", None) or out.past_key_values
                scores = out.logits[:, -1, :].float()
                scores = processors(all_ids, scores)
                if options.greedy:
                    nxt = int(scores.argmax(-1))
                else:
                    probs = torch.softmax(scores, dim=-1).cpu()
                    nxt = int(torch.multinomial(probs, 1, generator=generator))
                yield nxt
                step_ids = torch.tensor([[nxt]], device=device)
                all_ids = torch.cat([all_ids, step_ids], dim=-1)

    def _processors(self, options: GenerationOptions) -> Any:
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        procs = LogitsProcessorList()
        if options.constraint is not None:
            from chatglm_core.constrain import logits_processor

            procs.append(logits_processor(options.constraint, self.tokenizer, self.format.name))
        if options.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        if options.presence_penalty or options.frequency_penalty:
            procs.append(_OpenAIPenalties(options.presence_penalty, options.frequency_penalty))
        if not options.greedy:
            procs.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k:
                procs.append(TopKLogitsWarper(options.top_k))
            if options.top_p < 1.0:
                procs.append(TopPLogitsWarper(options.top_p))
        return procs


class _OpenAIPenalties:
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


class _TextAssembler:
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
        # a character cut by max_tokens is garbage: dropped from the final text too, so the
        # streamed reply and the whole one stay equal
        self.text = self.text.rstrip("\ufffd")
        if self.silenced:
            return ""
        return self._emit(len(self.text))

"""Context management: fit a conversation to the model's context window, with room for the reply.

A conversation outgrows the window sooner or later (a long paste, a long chat, big tool output).
Rather than failing every later turn, every front end (the app's three modes, the terminal chat,
Gradio, `chat()`) asks the engine to *fit* the messages first (`Engine.stream(..., fit_context=True)`):

- the system prompt always stays;
- the oldest turns leave the model's view first, a whole turn at a time (a user message and every
  reply, tool call and observation after it), so a tool call never loses its observation;
- the newest turn always stays; when it alone is too big, its longest messages are cut in the middle
  with a marker saying so.

The conversation itself (what the user sees and what is saved) is never changed: only the prompt
is. The front ends show what was left out (`ContextTrimmed`). The OpenAI-compatible API does not fit:
it keeps OpenAI's behaviour, a 400 `context_length_exceeded`.

Tool results and interpreter output are capped in *tokens*, a share of the window
(`RESULT_SHARE`), so one observation can never fill the context by itself.

Hand-written because the rules are ours (turn boundaries, the system prompt, tool pairs) and the
token counts come from our own prompt formats; the only search is a bisection over how many turns
to leave out, each step one count of the whole prompt (as the engine will encode it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from typing import Any

from chatglm_core.messages import Message, Role

#: A tool result or interpreter output may take at most this share of the context window.
RESULT_SHARE = 0.25
#: What is said, in the message itself, where a too-long message was cut for the model.
CUT_MARKER = "\n[… {n} characters cut here: this message is longer than the model's context window allows …]\n"
RESULT_MARKER = "\n[… output truncated to fit the model's context: {n} characters not shown …]\n"
_MAX_CUTS = 24  # cutting converges in two or three rounds; this only bounds a pathological counter


@dataclass
class ContextFit:
    """What the model sees of a conversation."""

    messages: list[Message]  # the prompt's messages (the caller's objects, cut ones copied)
    left_out: list[Message] = field(default_factory=list)  # the caller's messages no longer seen
    cut: list[Message] = field(default_factory=list)  # the caller's messages seen only in part
    tokens: int = 0  # prompt tokens of `messages` (0 when not counted)
    budget: int = 0  # the most prompt tokens allowed (0: no limit known)

    @property
    def trimmed(self) -> bool:
        return bool(self.left_out or self.cut)


def reply_room(context_window: int, max_new_tokens: int) -> int:
    """Tokens kept free for the reply: max_new_tokens, but never more than half the window."""
    return max(1, min(max_new_tokens, context_window // 2))


def prompt_budget(context_window: int, max_new_tokens: int) -> int:
    return context_window - reply_room(context_window, max_new_tokens)


def fit_messages(messages: list[Message], count: Callable[[list[Message]], int], budget: int) -> ContextFit:
    """`messages` cut to at most `budget` prompt tokens as `count` measures them (see the module doc)."""
    head = messages[:1] if messages and messages[0].role is Role.SYSTEM else []
    body = messages[len(head):]
    starts = _turn_starts(body)
    last = len(starts) - 1
    if _probably_fits(messages, budget):  # the common case: one count of the whole prompt
        tokens = count(messages)
        if tokens <= budget:
            return ContextFit(list(messages), tokens=tokens, budget=budget)
        start: int | None = _first_fitting_start(head, body, starts, count, budget, 0, last)
    else:
        start = _gallop(head, body, starts, count, budget)
        if start is None:
            return ContextFit(list(messages), tokens=count(messages), budget=budget)
    keep_from = starts[start]
    fit = ContextFit(head + body[keep_from:], left_out=list(body[:keep_from]), budget=budget)
    if start == last:  # only the newest turn is left: it may still be too long
        _cut_to_fit(fit, count)
    fit.tokens = count(fit.messages)
    return fit


def _probably_fits(messages: list[Message], budget: int) -> bool:
    # A token is seldom more than four characters of text, so a longer conversation is very likely
    # too long: then search back from the newest turn instead of counting it all. Both searches
    # give the same answer; this only picks the cheaper one.
    return sum(len(m.content) for m in messages) <= 4 * budget


def _turn_starts(body: list[Message]) -> list[int]:
    """Where each turn begins: the first message, then every user message."""
    return [0] + [i for i, m in enumerate(body) if i and m.role is Role.USER]


def _fits(head: list[Message], body: list[Message], start: int, count: Callable[[list[Message]], int],
          budget: int) -> bool:
    return count(head + body[start:]) <= budget


def _gallop(head: list[Message], body: list[Message], starts: list[int], count: Callable[[list[Message]], int],
            budget: int) -> int | None:
    """The earliest turn (index into `starts`) from which the rest fits, searching back from the newest
    turn in doubling steps, so that in a very long conversation only prompts near the budget are
    counted; None when everything fits."""
    last = len(starts) - 1
    if not _fits(head, body, starts[last], count, budget):
        return last  # not even the newest turn: it is cut
    ok, step = last, 1
    while ok - step >= 0 and _fits(head, body, starts[ok - step], count, budget):
        ok -= step
        step *= 2
    if ok == 0:
        return None
    if ok - step < 0:  # ran out of turns before one failed: is the whole conversation short enough?
        if _fits(head, body, 0, count, budget):
            return None
        return _first_fitting_start(head, body, starts, count, budget, 0, ok)
    return _first_fitting_start(head, body, starts, count, budget, ok - step, ok)


def _first_fitting_start(head: list[Message], body: list[Message], starts: list[int],
                         count: Callable[[list[Message]], int], budget: int, lo: int, hi: int) -> int:
    """Bisection for the earliest start in starts[lo..hi] from which the rest fits, given that
    starts[lo] does not and starts[hi] does (or is the last resort: the newest turn, cut)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits(head, body, starts[mid], count, budget):
            hi = mid
        else:
            lo = mid
    return hi


def _cut_to_fit(fit: ContextFit, count: Callable[[list[Message]], int]) -> None:
    """Cut the longest messages of `fit.messages` in the middle until the prompt fits."""
    originals = list(fit.messages)
    removed: dict[int, int] = {}
    for _ in range(_MAX_CUTS):
        tokens = count(fit.messages)
        if tokens <= fit.budget:
            return
        i = _longest(fit.messages)
        if i is None:
            return  # nothing left to cut: the engine will say the prompt is too long
        chars_per_token = max(1.0, sum(len(m.content) for m in fit.messages) / max(1, tokens))
        # each round cuts the original afresh, a little more, so there is only ever one marker
        removed[i] = removed.get(i, 0) + int((tokens - fit.budget) * chars_per_token * 1.1) + 16
        fit.messages[i] = dataclasses.replace(originals[i], content=cut_middle(originals[i].content, removed[i],
                                                                               CUT_MARKER))
        if not any(originals[i] is c for c in fit.cut):
            fit.cut.append(originals[i])


def _longest(messages: list[Message]) -> int | None:
    """The message to cut next: the longest non-system one, the system prompt only as a last resort."""
    sizes = [(len(m.content), i) for i, m in enumerate(messages)
             if len(m.content) > 2 * len(CUT_MARKER) and m.role is not Role.SYSTEM]
    if not sizes:
        sizes = [(len(m.content), i) for i, m in enumerate(messages) if len(m.content) > 2 * len(CUT_MARKER)]
    return max(sizes)[1] if sizes else None


def cut_middle(text: str, remove: int, marker: str) -> str:
    """`text` less about `remove` characters (and the marker's own length) from its middle: the
    start (two thirds of what stays) and the end (one third) survive, as in sandbox output."""
    marker_len = len(marker.format(n=remove))
    keep = max(0, len(text) - remove - marker_len)
    head, tail = keep * 2 // 3, keep // 3
    return text[:head] + marker.format(n=len(text) - head - tail) + text[len(text) - tail:]


def cap_tokens(text: str, limit: int, count_text: Callable[[str], int]) -> str:
    """`text` cut in the middle (with RESULT_MARKER) to at most `limit` tokens by `count_text`."""
    # no token is much longer than 32 characters: a cheap character cut first bounds the counting cost
    removed = max(0, len(text) - limit * 32)
    capped = cut_middle(text, removed, RESULT_MARKER) if removed else text
    for _ in range(_MAX_CUTS):
        tokens = count_text(capped)
        if tokens <= limit:
            break
        chars_per_token = max(1.0, len(capped) / max(1, tokens))
        removed += int((tokens - limit) * chars_per_token * 1.1) + 16
        capped = cut_middle(text, removed, RESULT_MARKER)  # from the original: one marker only
    return capped


def result_token_limit(context_window: int | None) -> int | None:
    """The most tokens one tool result may take (None when the window is unknown)."""
    return max(64, int(context_window * RESULT_SHARE)) if context_window else None


def text_counter(backend: Any) -> Callable[[str], int]:
    """Tokens of a plain text with the backend's tokenizer (about four characters a token without one)."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None and callable(getattr(tokenizer, "encode", None)):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    return lambda text: len(text) // 4 + 1


def cap_result(text: str, backend: Any) -> str:
    """A tool result or interpreter output capped at `result_token_limit` of the backend's window."""
    limit = result_token_limit(getattr(backend, "context_window", None))
    return text if limit is None else cap_tokens(text, limit, text_counter(backend))


def notice_text(left_out: int, cut: int, context_window: int) -> str:
    """The plain words every front end shows when the model does not see the whole conversation."""
    parts = []
    if left_out:
        which = "earliest message" if left_out == 1 else f"{left_out} earliest messages"
        parts.append(f"The model no longer sees the {which} of this conversation: the conversation is longer "
                     f"than its context window ({context_window:,} tokens with room for the reply).")
    if cut:
        which = "a message" if cut == 1 else f"{cut} messages"
        parts.append(f"It sees only the start and end of {which} too long to fit; the cut is marked.")
    return " ".join(parts)

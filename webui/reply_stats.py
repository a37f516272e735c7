"""What happened to each reply: how it ended (stopped, cut by max new tokens) and how fast it came.

A live turn records these in the reply's `Message.meta` (saved with the message, so a refresh or
an export keeps them); the history shows them under each reply from there:

- ``finish``: "stop", "tool_calls", "length" (cut by max new tokens), "stopped" (by the user, a
  click or a page switch; also what a partial reply saved mid-stream says until it ends), …
- ``tokens``: the reply's generated tokens (the engine's count; for a stopped reply the pieces
  received, marked approximate by ``tokens_approx``).
- ``ttft_s``: seconds from the start of the generation to its first piece of text.
- ``tok_s``: decode speed after the first token, (tokens - 1) / seconds from first to last.
- ``max_new_tokens``: the limit a "length" reply ran into.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

SHOW_KEY = "show_reply_stats"
STOPPED = ":material/stop_circle: stopped — the partial reply is kept"


def timing(*, tokens: int, started: float, first: float | None, ended: float) -> dict[str, Any]:
    """The timing part of a reply's meta, from monotonic timestamps."""
    first = ended if first is None else first
    meta: dict[str, Any] = {"tokens": tokens, "ttft_s": round(first - started, 3)}
    if tokens > 1 and ended > first:
        meta["tok_s"] = round((tokens - 1) / (ended - first), 1)
    return meta


def end_note(meta: dict[str, Any]) -> str | None:
    """A line saying why the reply ended early, or None when it ended by itself."""
    finish = meta.get("finish")
    if finish == "stopped":
        return STOPPED
    if finish == "length":
        limit = meta.get("max_new_tokens")
        return (":material/content_cut: cut at the max new tokens limit"
                + (f" ({limit})" if limit else "")
                + " — raise *Max new tokens* under Generation and press Retry for the whole reply")
    return None


def stats_line(meta: dict[str, Any]) -> str | None:
    """"42 tokens · first token 0.31 s · 95.2 tokens/s", or None when nothing was measured."""
    if "tokens" not in meta:
        return None
    approx = "≈" if meta.get("tokens_approx") else ""
    parts = [f"{approx}{meta['tokens']} tokens"]
    if meta.get("ttft_s") is not None:
        parts.append(f"first token {meta['ttft_s']:.2f} s")
    if meta.get("tok_s") is not None:
        parts.append(f"{meta['tok_s']:.1f} tokens/s")
    return " · ".join(parts)


def show(meta: dict[str, Any], target: Any = None) -> None:
    """Draw the end note and (unless hidden in the sidebar) the stats under a reply."""
    target = st if target is None else target
    if note := end_note(meta):
        target.caption(note)
    if st.session_state.get(SHOW_KEY, True) and (line := stats_line(meta)):
        target.caption(f":material/speed: {line}")

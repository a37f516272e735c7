"""Gradio web chat: ``python -m chatglm_core.web_gradio --port 7860``.

A thin adapter over the same engine as the Streamlit app and the CLI: streamed replies, a system
prompt, temperature / top_p / max new tokens, a Stop button that really ends the generation (it
sets the engine's cancel event, so the model is free for the next caller at once) and Clear.
Gradio is optional (``pip install -r requirements-gradio.txt``) and imported only here.
"""

# No `from __future__ import annotations` here: Gradio finds the `gr.Request` parameter of a
# handler by its real (evaluated) annotation.
import argparse
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.chat import options_from
from chatglm_core.cli import add_model_arguments, load_engine
from chatglm_core.context import notice_text
from chatglm_core.engine import Engine
from chatglm_core.errors import ChatGLMError
from chatglm_core.messages import ContextTrimmed, Done, Message, Role, TextDelta
from chatglm_core.settings import Settings

INSTALL_HINT = ("error: the Gradio web chat needs gradio, which is not installed.\n"
                "Install it with:  .venv/bin/pip install -r requirements-gradio.txt")
STOPPED = " [stopped]"
CONTEXT_TITLE = "Earlier messages are no longer seen by the model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chatglm_core.web_gradio", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    add_model_arguments(p)
    return p.parse_args(argv)


def text_of(content: Any) -> str:
    """A Gradio message's text: a plain string, or the text parts of its content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


def to_messages(system: str, history: list[dict[str, Any]], query: str) -> list[Message]:
    """Chatbot history (Gradio's message dicts) plus the new question, as engine messages."""
    messages = [Message(Role.SYSTEM, system)] if system.strip() else []
    for h in history or []:
        if h.get("role") in ("user", "assistant") and not h.get("metadata"):
            text = text_of(h.get("content"))
            if h["role"] == "assistant" and text.endswith(STOPPED):
                text = text[: -len(STOPPED)]
            messages.append(Message(Role(h["role"]), text))
    return messages + [Message(Role.USER, query)]


class WebChat:
    """The event handlers, kept apart from the layout so tests can drive them without a browser.

    One cancel event per browser session (Gradio's session hash), so Stop in one tab never stops
    another tab's reply.
    """

    def __init__(self, engine: Engine, settings: Settings, seed: int | None = None) -> None:
        self.engine, self.settings, self.seed = engine, settings, seed
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def respond(self, query: str, history: list[dict[str, Any]], system: str, temperature: float, top_p: float,
                max_new_tokens: float, session: str = "") -> Iterator[tuple[list[dict[str, Any]], str]]:
        """Yield (chat history with the growing reply, text box value) as tokens arrive."""
        query = (query or "").strip()
        history = list(history or [])
        if not query:
            yield history, ""
            return
        options = self.options(temperature, top_p, max_new_tokens)
        messages = to_messages(system or "", history, query)
        history.append({"role": "user", "content": query})
        reply = ""
        cancel = threading.Event()
        with self._lock:
            self._cancels[session] = cancel
        try:
            for ev in self.engine.stream(messages, options, cancel=cancel, fit_context=True):
                if isinstance(ev, ContextTrimmed):  # a note in the chat (metadata: never sent to the model)
                    history.append({"role": "assistant", "content": notice_text(len(ev.left_out), len(ev.cut),
                                                                                ev.context_window),
                                    "metadata": {"title": CONTEXT_TITLE}})
                elif isinstance(ev, TextDelta):
                    reply += ev.text
                    yield history + [{"role": "assistant", "content": reply}], ""
                elif isinstance(ev, Done) and ev.finish_reason == "cancelled":
                    reply += STOPPED
            yield history + [{"role": "assistant", "content": reply}], ""
        finally:
            with self._lock:
                if self._cancels.get(session) is cancel:
                    del self._cancels[session]
            cancel.set()

    def stop(self, session: str = "") -> None:
        """End this session's running reply within a token (no-op when none runs)."""
        with self._lock:
            cancel = self._cancels.get(session)
        if cancel is not None:
            cancel.set()

    def options(self, temperature: float, top_p: float, max_new_tokens: float) -> GenerationOptions:
        # Gradio's sliders have already rejected out-of-range values with a message naming them.
        return options_from(self.settings, self.engine.backend, temperature=float(temperature), top_p=float(top_p),
                            max_new_tokens=int(max_new_tokens), seed=self.seed)


def build_app(chat: WebChat) -> Any:
    """The Blocks layout; its `chat` endpoint is also the HTTP API (see gradio_client)."""
    import gradio as gr

    s = chat.settings

    def respond(query: str, history: list, system: str, temperature: float, top_p: float, max_new_tokens: float,
                request: gr.Request) -> Iterator[tuple[list, str]]:
        try:
            yield from chat.respond(query, history, system, temperature, top_p, max_new_tokens,
                                    session=request.session_hash or "")
        except ChatGLMError as e:  # shown in the page; the server keeps running
            raise gr.Error(str(e)) from None

    def stop(request: gr.Request) -> None:
        chat.stop(request.session_hash or "")

    def clear(request: gr.Request) -> tuple[list, str]:
        chat.stop(request.session_hash or "")
        return [], ""

    with gr.Blocks(title=f"Chat with {chat.engine.model_name}", analytics_enabled=False) as app:
        gr.Markdown(f"### Chat with {chat.engine.model_name} ({chat.engine.backend.device})")
        chatbot = gr.Chatbot(label="Conversation", height=480)
        query = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, autofocus=True)
        with gr.Row():
            send = gr.Button("Send", variant="primary")
            stop_btn = gr.Button("Stop", variant="stop")
            clear_btn = gr.Button("Clear history")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(value=s.system_prompt, label="System prompt", lines=2)
            d = options_from(s, chat.engine.backend)  # the settings', else the model's recommendation
            temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top p")
            max_new = gr.Slider(1, max(4096, s.max_new_tokens), value=s.max_new_tokens, step=1,
                                label="Max new tokens")
        inputs = [query, chatbot, system, temperature, top_p, max_new]
        # The engine queues generations itself, so Gradio need not hold sessions back.
        submitted = query.submit(respond, inputs, [chatbot, query], api_name="chat", concurrency_limit=None)
        clicked = send.click(respond, inputs, [chatbot, query], api_visibility="private", concurrency_limit=None)
        stop_btn.click(stop, None, None, cancels=[submitted, clicked], api_name="stop", concurrency_limit=None)
        clear_btn.click(clear, None, [chatbot, query], cancels=[submitted, clicked], api_name="clear",
                        concurrency_limit=None)
    return app


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    loaded = load_engine(args)
    if loaded is None:
        return 2
    settings, engine = loaded
    app = build_app(WebChat(engine, settings, args.seed))
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)
    except OSError as e:  # port taken, address not ours
        print(f"error: cannot listen on {args.host}:{args.port}: {str(e).rstrip('.')}. Pick another --port or --host.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Terminal chat: ``python -m chatglm_core.cli``.

Streams replies as they are generated. ``clear`` resets the history, ``stop``/``exit``/Ctrl-D
quits, Ctrl-C stops the current reply (keeping what was said) without quitting.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TextIO

from chatglm_core.chat import options_from
from chatglm_core.context import notice_text
from chatglm_core.engine import Engine
from chatglm_core.errors import ChatGLMError
from chatglm_core.messages import ContextTrimmed, Done, Message, Role, TextDelta
from chatglm_core.settings import Settings, load_settings

WELCOME = "Chat with {model} ({device}). Type 'clear' to reset, 'stop' or 'exit' to quit, Ctrl-C stops a reply."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chatglm_core.cli", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    return p.parse_args(argv)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and generation flags every entry point shares; `settings_from` reads them."""
    p.add_argument("--model-path", help="HF model folder or .gguf file (default: $MODEL_PATH or embedded SmolLM2)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--seed", type=int)


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(model_path=args.model_path, device=args.device, dtype=args.dtype,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty,
                         system_prompt=args.system)


class ChatSession:
    """The REPL's state, separate from I/O so it can be driven by tests."""

    def __init__(self, engine: Engine, settings: Settings, seed: int | None = None) -> None:
        self.engine, self.settings, self.seed = engine, settings, seed
        self.history: list[Message] = []
        self.cancel: threading.Event | None = None

    def messages(self, query: str) -> list[Message]:
        system = [Message(Role.SYSTEM, self.settings.system_prompt)] if self.settings.system_prompt else []
        return system + self.history + [Message(Role.USER, query)]

    def reply(self, query: str, out: TextIO) -> str:
        self.cancel = threading.Event()
        text = ""
        try:
            for ev in self.engine.stream(self.messages(query), options_from(self.settings, self.engine.backend,
                                                                                   seed=self.seed),
                                         cancel=self.cancel, fit_context=True):
                if isinstance(ev, ContextTrimmed):
                    out.write(f"[{notice_text(len(ev.left_out), len(ev.cut), ev.context_window)}]\n")
                elif isinstance(ev, TextDelta):
                    text += ev.text
                    out.write(ev.text)
                    out.flush()
                elif isinstance(ev, Done) and ev.finish_reason == "cancelled":
                    out.write(" [stopped]")
        finally:
            self.cancel = None
        out.write("\n")
        self.history += [Message(Role.USER, query), Message(Role.ASSISTANT, text)]
        return text


def repl(session: ChatSession, inp: TextIO, out: TextIO) -> None:
    while True:
        out.write("\nUser: ")
        out.flush()
        line = inp.readline()
        if not line:  # Ctrl-D
            out.write("\n")
            return
        query = line.strip()
        if query in ("stop", "exit", "quit"):
            return
        if query == "clear":
            session.history.clear()
            out.write("(history cleared)\n")
            continue
        if not query:
            continue
        out.write(f"\n{session.engine.model_name}: ")
        try:
            session.reply(query, out)
        except ChatGLMError as e:
            out.write(f"\n[error] {e}\n")


def load_engine(args: argparse.Namespace) -> tuple[Settings, Engine] | None:
    """Settings and engine for a front end's flags; None (after printing the error) if they fail."""
    try:
        settings = settings_from(args)
        from chatglm_core.backends import load_backend

        print("Loading the model…", file=sys.stderr, flush=True)
        return settings, Engine(load_backend(settings))
    except ChatGLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_engine(args)
    if loaded is None:
        return 2
    settings, engine = loaded
    session = ChatSession(engine, settings, args.seed)

    def on_sigint(signum: int, frame: object) -> None:
        if session.cancel is not None:
            session.cancel.set()  # stop this reply, keep the chat
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    runtime = getattr(engine.backend, "runtime", None)
    print(WELCOME.format(model=engine.model_name, device=engine.backend.device + (f", {runtime}" if runtime else "")))
    sampling = getattr(engine.backend, "sampling", None)
    if sampling is not None:
        print(f"Sampling: {sampling.describe()}; --temperature/--top-p change it.")
    try:
        repl(session, sys.stdin, sys.stdout)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One sandbox per browser session, reaped when idle, all closed when the app exits.

The app keeps one pool (e.g. in ``st.cache_resource``) and calls ``pool.get(session_id)`` on every
run; the kernel and its variables survive between a session's messages. A background thread closes
sandboxes unused for ``settings.sandbox_idle_seconds`` (their variables and files are gone; the next
``get`` starts a fresh one). ``close_all`` runs at exit; kernels also die with the app if it is killed
(a parent-death signal, see `sandbox_jail`).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable

from chatglm_core.sandbox import Sandbox
from chatglm_core.settings import Settings


class SandboxPool:
    def __init__(self, settings: Settings, factory: Callable[[], Sandbox] | None = None,
                 reap_every: float | None = None) -> None:
        self.idle_seconds = settings.sandbox_idle_seconds
        self._factory = factory or (lambda: Sandbox.from_settings(settings))
        self._boxes: dict[str, Sandbox] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        interval = reap_every if reap_every is not None else min(60.0, max(0.5, self.idle_seconds / 4))
        self._reaper = threading.Thread(target=self._reap_loop, args=(interval,), name="sandbox-reaper", daemon=True)
        self._reaper.start()
        atexit.register(self.close_all)

    def get(self, session_id: str) -> Sandbox:
        """This session's sandbox, started on first use (or after it was reaped or closed)."""
        if not isinstance(session_id, str) or not session_id:
            raise ValueError("session_id must be a non-empty string")
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the sandbox pool is closed")
            box = self._boxes.get(session_id)
            if box is None or box.closed:
                box = self._boxes[session_id] = self._factory()
            box.last_used = time.monotonic()
            return box

    def close(self, session_id: str) -> None:
        with self._lock:
            box = self._boxes.pop(session_id, None)
        if box is not None:
            box.close()

    def reap_idle(self) -> list[str]:
        """Close sandboxes idle for longer than idle_seconds (not one that is running); their ids."""
        now = time.monotonic()
        with self._lock:
            stale = [sid for sid, box in self._boxes.items()
                     if now - box.last_used > self.idle_seconds and not box.busy]
            boxes = [self._boxes.pop(sid) for sid in stale]
        for box in boxes:
            box.close()
        return stale

    def close_all(self) -> None:
        self._stop.set()
        with self._lock:
            boxes, self._boxes = list(self._boxes.values()), {}
        for box in boxes:
            box.close()

    def __len__(self) -> int:
        return len(self._boxes)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._boxes

    def _reap_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.reap_idle()

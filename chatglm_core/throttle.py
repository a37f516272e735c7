"""Slowing down password guessing: per account name and per client address, in this process.

After `free_failures` failed logins for a key, the key is locked for `base_delay` seconds, doubling with
each further failure up to `max_delay`; a login attempted while any of its keys is locked is refused
without checking the password. A key forgets its failures `forget_after` seconds after the last one.
Hand-written (a few lines) because the login libraries we could use (slowapi, limits) count requests
per time window for HTTP routes, not failures with a growing lockout inside a Streamlit session.
Counts live in memory: a restart clears them, and so does running several app processes (each
counts its own). At most `max_keys` keys are kept, the oldest dropped first, so a flood of made-up
names cannot grow memory without bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Record:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    def __init__(self, *, free_failures: int = 5, base_delay: float = 1.0, max_delay: float = 900.0,
                 forget_after: float = 3600.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_keys = max_keys
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._lock = threading.Lock()

    def wait_seconds(self, *keys: str) -> float:
        """How long until an attempt for these keys is allowed (0: now)."""
        now = self._clock()
        with self._lock:
            waits = [r.locked_until - now for k in keys if (r := self._live(k, now)) is not None]
        return max([0.0, *waits])

    def failed(self, *keys: str) -> float:
        """Count a failed login for each key; returns the longest lockout it started (0: none yet)."""
        now = self._clock()
        longest = 0.0
        with self._lock:
            for key in keys:
                r = self._live(key, now) or _Record()
                r.failures += 1
                r.last_failure = now
                over = r.failures - self.free_failures
                if over > 0:
                    delay = min(self.max_delay, self.base_delay * 2 ** (over - 1))
                    r.locked_until = now + delay
                    longest = max(longest, delay)
                self._records[key] = r
                self._records.move_to_end(key)
            while len(self._records) > self.max_keys:
                self._records.popitem(last=False)
        return longest

    def succeeded(self, *keys: str) -> None:
        """Forget these keys' failures (the account's, not the client's: see webui/auth.py)."""
        with self._lock:
            for key in keys:
                self._records.pop(key, None)

    def _live(self, key: str, now: float) -> _Record | None:
        r = self._records.get(key)
        if r is not None and now - r.last_failure > self.forget_after and now >= r.locked_until:
            del self._records[key]
            return None
        return r

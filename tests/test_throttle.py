"""Failed-login throttling, on a clock the test moves (the waits are minutes long in real life)."""

from __future__ import annotations

from chatglm_core.throttle import LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_free_failures_then_a_doubling_lockout_up_to_the_cap():
    clock = Clock()
    t = LoginThrottle(free_failures=3, base_delay=1, max_delay=8, clock=clock)
    assert [t.failed("user:a") for _ in range(3)] == [0, 0, 0]
    assert t.wait_seconds("user:a") == 0
    delays = []
    for _ in range(6):
        delays.append(t.failed("user:a"))
        assert t.wait_seconds("user:a") == delays[-1]
        clock.now += delays[-1]
        assert t.wait_seconds("user:a") == 0
    assert delays == [1, 2, 4, 8, 8, 8]


def test_any_locked_key_blocks_and_success_clears_only_its_key():
    clock = Clock()
    t = LoginThrottle(free_failures=1, base_delay=10, clock=clock)
    t.failed("user:a", "client:1.2.3.4")
    t.failed("user:a", "client:1.2.3.4")
    assert t.wait_seconds("user:b", "client:1.2.3.4") == 10  # another name from the same client
    assert t.wait_seconds("user:a", "client:5.6.7.8") == 10  # the same name from another client
    assert t.wait_seconds("user:b", "client:5.6.7.8") == 0
    clock.now += 10
    t.succeeded("user:a")
    t.failed("user:a", "client:1.2.3.4")
    assert t.wait_seconds("user:a") == 0  # the account starts over
    assert t.wait_seconds("client:1.2.3.4") == 20  # the client keeps counting


def test_failures_are_forgotten_after_a_while():
    clock = Clock()
    t = LoginThrottle(free_failures=2, base_delay=1, forget_after=60, clock=clock)
    t.failed("user:a")
    t.failed("user:a")
    clock.now += 61
    assert t.failed("user:a") == 0  # counting from one again


def test_made_up_names_cannot_grow_memory_without_bound():
    t = LoginThrottle(max_keys=100)
    for i in range(1000):
        t.failed(f"user:{i}")
    assert len(t._records) == 100

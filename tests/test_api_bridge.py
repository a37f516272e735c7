"""EngineRun: engine events handed to the event loop, on both of next()'s paths.

The first event is awaited with the request (polling for a disconnect), the rest without (the
per-token path of a stream); both must give the events in order, then None, and re-raise a
generation error.
"""

from __future__ import annotations

import asyncio

import pytest

from chatglm_core.api.bridge import EngineRun
from chatglm_core.backends.base import GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.errors import GenerationError
from chatglm_core.messages import Done, Message, Role, TextDelta

HI = [Message(Role.USER, "hi")]
TIMEOUT = 10  # a bridge that loses its end marker would otherwise wait forever


class ConnectedRequest:
    async def is_disconnected(self) -> bool:
        return False


class FailingBackend:
    model_name = "failing"
    context_window = 4096

    def stream(self, messages, options, **kw):
        yield TextDelta("partial")
        raise RuntimeError("the model broke")


async def drain(run: EngineRun) -> list:
    events = [await run.next(ConnectedRequest(), poll=0.01)]
    while (ev := await run.next()) is not None:
        events.append(ev)
    return events


def test_events_in_order_then_none(scripted):
    scripted.enqueue("Hello there, world")

    async def main() -> tuple[list, object]:
        run = EngineRun(Engine(scripted), HI, GenerationOptions(), None)
        events = await drain(run)
        return events, await run.next()

    events, after = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello there, world"
    assert isinstance(events[-1], Done) and events[-1].message.content == "Hello there, world"
    assert after is None


def test_generation_error_is_raised_then_the_run_has_ended():
    async def main() -> object:
        run = EngineRun(Engine(FailingBackend()), HI, GenerationOptions(), None)
        assert await run.next(ConnectedRequest(), poll=0.01) == TextDelta("partial")
        with pytest.raises(GenerationError, match="the model broke"):
            await run.next()
        return await run.next()

    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) is None

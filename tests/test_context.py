"""chatglm_core.context: fitting a conversation to the context window, table-style with a word
counter, then with the real SmolLM2 tokenizer and engine."""

from __future__ import annotations

import pytest

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.context import (
    cap_tokens,
    cut_middle,
    fit_messages,
    notice_text,
    prompt_budget,
    reply_room,
)
from chatglm_core.engine import Engine
from chatglm_core.messages import ContextTrimmed, Done, Message, Role, TextDelta, ToolCall

S, U, A, T = Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.TOOL


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def count(messages: list[Message]) -> int:
    """A stand-in prompt format: 2 tokens a message (role markers) plus one per word."""
    return sum(2 + len(m.content.split()) for m in messages)


def convo(*spec: tuple[Role, int]) -> list[Message]:
    return [Message(role, words(n, f"{role.value[0]}{i}_")) for i, (role, n) in enumerate(spec)]


# (conversation, budget, indexes of the messages the model keeps, indexes left out)
CASES = {
    "fits: unchanged": ([(S, 3), (U, 5), (A, 5), (U, 5)], 100, [0, 1, 2, 3], []),
    "oldest turn leaves, system stays": ([(S, 3), (U, 10), (A, 10), (U, 5), (A, 5), (U, 5)], 30,
                                         [0, 3, 4, 5], [1, 2]),
    "several turns leave at once": ([(S, 3), (U, 10), (A, 10), (U, 10), (A, 10), (U, 5)], 15, [0, 5], [1, 2, 3, 4]),
    "no system prompt": ([(U, 10), (A, 10), (U, 5), (A, 5), (U, 5)], 25, [2, 3, 4], [0, 1]),
    "exactly the budget fits": ([(U, 8), (A, 8), (U, 8)], 30, [0, 1, 2], []),
    # a turn with a tool call leaves whole: the observation never loses its call
    "tool call and observation leave together": ([(S, 2), (U, 3), (A, 3), (T, 20), (A, 3), (U, 4)], 20,
                                                  [0, 5], [1, 2, 3, 4]),
}


@pytest.mark.parametrize("name", CASES)
def test_fit_messages_leaves_out_the_oldest_turns(name):
    spec, budget, kept, left = CASES[name]
    messages = convo(*spec)
    fit = fit_messages(messages, count, budget)
    assert [messages.index(m) for m in fit.messages] == kept
    assert [messages.index(m) for m in fit.left_out] == left
    assert fit.cut == [] and fit.tokens == count(fit.messages) <= budget
    assert fit.trimmed == bool(left)
    assert all(m.content == words(n, f"{r.value[0]}{i}_") for i, (m, (r, n)) in enumerate(zip(messages, spec)))


def test_fit_messages_keeps_the_most_turns_that_fit():
    """Against brute force, on 300 random conversations (both searches: one count of the whole when
    it is short, doubling steps back from the newest turn when it is long)."""
    import random

    rng = random.Random(18)
    for _ in range(300):
        roles = [U] + [rng.choice([U, A, A, T]) for _ in range(rng.randrange(0, 30))] + [U]
        messages = ([Message(S, words(rng.randrange(1, 6)))] if rng.random() < 0.5 else []) + [
            Message(r, words(rng.randrange(0, 40))) for r in roles]
        budget = rng.randrange(10, 400)
        fit = fit_messages(messages, count, budget)
        head = 1 if messages[0].role is S else 0
        starts = [head] + [i for i in range(head + 1, len(messages)) if messages[i].role is U]
        fitting = [i for i in starts if count(messages[:head] + messages[i:]) <= budget]
        expected = fitting[0] if fitting else starts[-1]
        assert fit.left_out == messages[head:expected]
        assert fit.messages[:head] == messages[:head]
        if fitting:
            assert fit.messages[head:] == messages[expected:] and not fit.cut and fit.tokens <= budget
        else:  # the newest turn alone, its long messages cut (these short ones are left as they are)
            assert [m.role for m in fit.messages[head:]] == [m.role for m in messages[expected:]]


def test_a_newest_turn_too_big_is_cut_in_the_middle_with_a_marker():
    messages = convo((S, 3), (U, 10), (A, 10), (U, 400))
    big = messages[-1]
    fit = fit_messages(messages, count, 100)
    assert fit.left_out == messages[1:3] and fit.cut == [big]
    assert count(fit.messages) <= 100 and fit.messages[0] is messages[0]
    seen = fit.messages[-1].content
    assert seen.startswith("u3_0 u3_1") and seen.endswith("u3_399")  # its start and end survive
    assert "characters cut here" in seen
    assert big.content == words(400, "u3_")  # the caller's message is untouched


def test_cutting_picks_the_longest_message_of_the_turn_and_leaves_one_marker():
    call = ToolCall("search", {"q": "x"})
    messages = [Message(U, "find it"), Message(A, "", [call]), Message(T, words(500), tool_call_id=call.id)]
    fit = fit_messages(messages, count, 120)
    assert fit.cut == [messages[2]] and fit.messages[:2] == messages[:2]
    assert fit.messages[2].content.count("characters cut here") == 1
    assert fit.tokens <= 120


def test_a_system_prompt_alone_too_big_is_cut_last():
    messages = [Message(S, words(300)), Message(U, "hi")]
    fit = fit_messages(messages, count, 60)
    assert fit.cut == [messages[0]] and fit.messages[1] is messages[1] and fit.tokens <= 60


@pytest.mark.parametrize("window,max_new,room,budget", [
    (4096, 512, 512, 3584),
    (4096, 8, 8, 4088),
    (4096, 10_000, 2048, 2048),  # never more than half the window for the reply
    (2, 1, 1, 1),
])
def test_reply_room_and_budget(window, max_new, room, budget):
    assert reply_room(window, max_new) == room and prompt_budget(window, max_new) == budget


@pytest.mark.parametrize("text,remove,expected", [
    ("a" * 100, 40, "a" * 37 + "<45>" + "a" * 18),  # two thirds of what stays before the marker, one after
    ("abcdefghij", 4, "ab<7>j"),
    ("abc", 10, "<3>"),  # nothing left but the marker
])
def test_cut_middle_keeps_start_and_end(text, remove, expected):
    assert cut_middle(text, remove, "<{n}>") == expected


def test_notice_says_which_messages_plainly():
    assert notice_text(2, 0, 4096) == ("The model no longer sees the 2 earliest messages of this conversation: the "
                                       "conversation is longer than its context window (4,096 tokens with room "
                                       "for the reply).")
    assert "earliest message of" in notice_text(1, 0, 512)
    assert notice_text(0, 1, 512) == "It sees only the start and end of a message too long to fit; the cut is marked."


# --- the real tokenizer and model ------------------------------------------------------------------
def test_cap_tokens_with_the_real_tokenizer(small_backend):
    from chatglm_core.context import cap_result, text_counter

    counter = text_counter(small_backend)
    big = "x" * 5_000_000
    capped = cap_tokens(big, 1024, counter)
    assert counter(capped) <= 1024 and "output truncated" in capped
    assert capped.startswith("xxxx") and capped.endswith("xxxx")
    assert cap_tokens("short", 1024, counter) == "short"
    # cap_result: a quarter of the backend's window
    result = cap_result("line of output\n" * 5000, small_backend)
    assert counter(result) <= small_backend.context_window // 4


@pytest.fixture
def window_512(small_backend, monkeypatch):
    monkeypatch.setattr(small_backend, "context_window", 512)
    return Engine(small_backend)


def test_engine_fit_uses_the_exact_prompt(window_512):
    engine = window_512
    messages = [Message(S, "Be brief."), Message(U, "lorem ipsum " * 300), Message(A, "OK."), Message(U, "Hi")]
    fit = engine.fit(messages, GenerationOptions(max_new_tokens=16))
    assert fit.left_out == messages[1:3] and fit.messages == [messages[0], messages[3]]
    assert fit.tokens == len(engine.backend.prompt_ids(fit.messages)) <= 512 - 16


def test_a_conversation_of_three_windows_goes_on_answering(window_512):
    """The real model: each turn adds ~300 tokens; after 3x the window it still answers, and the
    API behaviour (no fitting) still refuses the whole history."""
    engine = window_512
    options = GenerationOptions(max_new_tokens=4, temperature=0)
    history = [Message(S, "You are a helpful assistant.")]
    notices = []
    for turn in range(6):
        history.append(Message(U, f"Note {turn}: " + "the quick brown fox jumps over the lazy dog. " * 30))
        reply = ""
        for ev in engine.stream(history, options, fit_context=True):
            if isinstance(ev, ContextTrimmed):
                notices.append(ev)
            elif isinstance(ev, TextDelta):
                reply += ev.text
            elif isinstance(ev, Done):
                assert ev.finish_reason in ("stop", "length") and ev.usage.prompt_tokens <= 512 - 4
        history.append(Message(A, reply or "(empty)"))
    assert len(engine.backend.prompt_ids(history)) > 3 * 512
    assert notices and notices[-1].left_out and notices[-1].context_window == 512
    assert history[0] not in notices[-1].left_out  # the system prompt stays
    from chatglm_core.errors import RequestError

    with pytest.raises(RequestError) as e:
        engine.complete(history + [Message(U, "Hi")], options)
    assert e.value.code == "context_length_exceeded"


def test_interpreter_output_is_capped_in_tokens_relative_to_the_window(small_backend):
    """What the sandbox gives for print('x' * 5_000_000) (20,000 characters, ~5,300 tokens: more than a
    4,096-token window) reaches the model as at most a quarter of the window."""
    from conftest import ScriptedBackend

    from chatglm_core.agent import run_agent
    from chatglm_core.context import text_counter
    from chatglm_core.messages import ToolResultEvent
    from chatglm_core.sandbox_output import ExecResult
    from tools.registry import ToolRegistry

    class Sandbox:
        def run(self, code, timeout=None):
            return ExecResult("ok", "x" * 20_000)

    backend = ScriptedBackend()
    backend.tokenizer = small_backend.tokenizer  # the real tokenizer counts
    backend.enqueue("```python\nprint('x' * 5_000_000)\n```", "Many x.")
    counter = text_counter(small_backend)
    assert counter("x" * 20_000) > 4096
    registry = ToolRegistry(max_result_chars=10**6)  # no character cap: the token cap alone
    events = list(run_agent(Engine(backend), [Message(U, "Print many x.")], registry=registry, sandbox=Sandbox(),
                            fit_context=True))
    (result,) = [e for e in events if isinstance(e, ToolResultEvent)]
    assert counter(result.message.content) <= 1024 and "output truncated" in result.message.content
    assert backend.calls[-1][-1].content == result.message.content  # what the model read


def test_chat_with_a_history_longer_than_the_window_answers(window_512):
    from chatglm_core.chat import chat

    long_turn = "the quick brown fox jumps over the lazy dog. " * 40
    history = [{"role": r, "content": long_turn} for r in ("user", "assistant") * 3]
    response, new_history = chat("Hi", history, engine=window_512, max_new_tokens=4, temperature=0)
    assert response.strip() and new_history[:6] == history and len(new_history) == 8  # the history stays whole

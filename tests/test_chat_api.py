"""chat() / stream_chat(): ChatGLM3's Python API over the shared engine."""

from chatglm_core.chat import chat, stream_chat


def test_chat_returns_response_and_history(small_engine):
    response, history = chat("What is the capital of France?", history=[], engine=small_engine, temperature=0,
                             max_new_tokens=20)
    assert response == "The capital of France is Paris."
    assert history == [{"role": "user", "content": "What is the capital of France?"},
                       {"role": "assistant", "content": response}]


def test_stream_chat_grows_to_the_chat_response(small_engine):
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": "Hello!"}]
    steps = [r for r, _ in stream_chat("Name a fruit.", hist, engine=small_engine, temperature=0, max_new_tokens=12)]
    assert len(steps) > 2
    assert all(steps[i + 1].startswith(steps[i].rstrip()) or steps[i + 1] == steps[i].strip()
               for i in range(len(steps) - 1))
    final, _ = chat("Name a fruit.", hist, engine=small_engine, temperature=0, max_new_tokens=12)
    assert steps[-1] == final

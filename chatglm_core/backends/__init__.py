"""Backends: where tokens come from. `load_backend` picks one from the settings."""

from __future__ import annotations

from chatglm_core.backends.base import Backend, Constraint, GenerationOptions
from chatglm_core.settings import Settings

__all__ = ["Backend", "Constraint", "GenerationOptions", "load_backend"]


def load_backend(settings: Settings) -> Backend:
    """A remote OpenAI-compatible engine when CHATGLM_REMOTE_BASE_URL is set, else a local model.

    Locally, "auto" means llama.cpp for a GGUF model (the embedded default included) when
    llama-cpp-python is installed and no GPU is used (several times faster on CPU; a small model's
    weights are converted to float16 first, see `backends.llamacpp`), and transformers otherwise.
    The backend carries its sampling defaults (`backend.sampling`: the settings', else the model's
    recommendation; see `chatglm_core.sampling`).
    """
    from chatglm_core.sampling import defaults

    backend = _load(settings)
    backend.sampling = defaults(settings)  # type: ignore[attr-defined]
    return backend


def _load(settings: Settings) -> Backend:
    if settings.backend == "remote" or (settings.backend == "auto" and settings.remote_base_url):
        from chatglm_core.backends.remote import RemoteBackend

        return RemoteBackend.from_settings(settings)
    if settings.backend == "llamacpp" or (settings.backend == "auto" and _llamacpp_fits(settings)):
        from chatglm_core.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend.from_settings(settings)
    from chatglm_core.backends.transformers_backend import TransformersBackend

    return TransformersBackend.from_settings(settings)


def _llamacpp_fits(settings: Settings) -> bool:
    """Whether "auto" should run this model on llama.cpp: a GGUF file, llama-cpp-python installed,
    and the model going to the CPU (transformers serves CUDA/MPS)."""
    from chatglm_core.backends import llamacpp

    if settings.quantize != "none" or settings.device_map or not llamacpp.available():
        return False
    try:
        if llamacpp.gguf_path(settings) is None:
            return False
    except Exception:  # noqa: BLE001 - e.g. the embedded model is missing: transformers says why
        return False
    if settings.device == "auto":
        from chatglm_core.models.loader import resolve_device

        return resolve_device("auto") == "cpu"
    return settings.device == "cpu"

"""Backends: where tokens come from. `load_backend` picks one from the settings."""

from __future__ import annotations

from chatglm_core.backends.base import Backend, Constraint, GenerationOptions
from chatglm_core.errors import ConfigError
from chatglm_core.settings import Settings

__all__ = ["Backend", "Constraint", "GenerationOptions", "load_backend"]


def load_backend(settings: Settings) -> Backend:
    """A remote OpenAI-compatible engine when CHATGLM_REMOTE_BASE_URL is set, else a local model.

    Locally, "auto" runs GGUF files (the embedded default included) on llama.cpp when
    llama-cpp-python is installed and no GPU is to be used, and everything else on transformers.
    """
    if settings.backend == "remote" or (settings.backend == "auto" and settings.remote_base_url):
        from chatglm_core.backends.remote import RemoteBackend

        return RemoteBackend.from_settings(settings)
    if settings.backend == "llamacpp" or (settings.backend == "auto" and _llamacpp_fits(settings)):
        from chatglm_core.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend.from_settings(settings)
    from chatglm_core.backends.transformers_backend import TransformersBackend

    return TransformersBackend.from_settings(settings)


def _llamacpp_fits(settings: Settings) -> bool:
    from chatglm_core.backends import llamacpp

    if not llamacpp.available() or settings.quantize != "none" or settings.device_map:
        return False
    if settings.device == "auto":
        import torch

        if torch.cuda.is_available():
            return False
    elif settings.device != "cpu":
        return False
    try:
        return llamacpp.gguf_path(settings) is not None
    except ConfigError:  # a missing embedded model is reported by the transformers path
        return False

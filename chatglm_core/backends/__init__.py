"""Backends: where tokens come from. `load_backend` picks one from the settings."""

from __future__ import annotations

from chatglm_core.backends.base import Backend, Constraint, GenerationOptions
from chatglm_core.settings import Settings

__all__ = ["Backend", "Constraint", "GenerationOptions", "load_backend"]


def load_backend(settings: Settings) -> Backend:
    """A remote OpenAI-compatible engine when CHATGLM_REMOTE_BASE_URL is set, else a local model.

    Locally, "auto" means transformers. llama.cpp (CHATGLM_BACKEND=llamacpp, GGUF models only) is
    several times faster on CPU but opt-in: it computes with the quantized weights (and quantized
    activations), and on the embedded SmolLM2 its greedy answers are visibly worse than the
    dequantized fp32 weights' (e.g. "What is the capital of France?" loses "Paris").
    """
    if settings.backend == "remote" or (settings.backend == "auto" and settings.remote_base_url):
        from chatglm_core.backends.remote import RemoteBackend

        return RemoteBackend.from_settings(settings)
    if settings.backend == "llamacpp":
        from chatglm_core.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend.from_settings(settings)
    from chatglm_core.backends.transformers_backend import TransformersBackend

    return TransformersBackend.from_settings(settings)

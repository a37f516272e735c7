"""The OpenAI-compatible HTTP server (``python -m chatglm_core.api``)."""

from chatglm_core.api.app import create_app

__all__ = ["create_app"]

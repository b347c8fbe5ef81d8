"""What `eval_gsm8k.py` needs beyond the two tools: the 0.5B-shaped model and the machine's floor.

- `ensure_qwen_shaped(dest, tokenizer_dir)`: a Qwen2 model of Qwen2.5-0.5B's published shape (24 layers,
  hidden 896, intermediate 4864, 14 heads, 2 KV heads, vocabulary 151,936, tied embeddings) with seeded
  random weights, saved once as an HF folder with SmolLM2's tokenizer (the Qwen tokenizer is on the Hub,
  which this machine cannot reach). Embedding rows past the tokenizer's 49,152 tokens are zero, so their
  logits are 0 and greedy decoding never picks them (the lm head still multiplies all 151,936 rows, so
  the cost is the real model's); random weights give text without stop strings: both tools generate the
  full budget and the comparison is pure throughput.
- `ensure_mistral_shaped(dest, tokenizer_dir)`: a Mistral model of Mistral-7B's proportions scaled to run
  here (head size 128, 4 query heads per KV head, MLP 3.5x hidden, 16 layers of hidden 1024; SmolLM2's
  vocabulary) with a sliding window of `MISTRAL_WINDOW` positions, shorter than a 5-shot prompt; and
  `opened_window_copy`, the same weights with the window opened (config `sliding_window: null`).
- `machine_rates()`: the memory bandwidth (a 1 GiB copy) and float32 matmul rate (a prefill-sized GEMM)
  of this machine, measured in this process.
- `floor(...)`: the arithmetic floor of a generation run, from those rates.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

QWEN_SHAPE = {
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False,
}
QWEN_SEED = 0
MISTRAL_WINDOW = 512
MISTRAL_SHAPE = {
    "vocab_size": 49152, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 16,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "sliding_window": MISTRAL_WINDOW, "initializer_range": 0.05,
}


def ensure_qwen_shaped(dest: Path, tokenizer_dir: Path) -> float | None:
    """Build the 0.5B-shaped model once at `dest` (written under a temporary name, then renamed)."""
    return _ensure_shaped(dest, tokenizer_dir, "Qwen2Config", QWEN_SHAPE)


def ensure_mistral_shaped(dest: Path, tokenizer_dir: Path) -> float | None:
    """Build the windowed Mistral-shaped model once at `dest` (init std 0.05: its greedy text depends on
    the prompt, so a window that is not applied changes it)."""
    return _ensure_shaped(dest, tokenizer_dir, "MistralConfig", MISTRAL_SHAPE)


def opened_window_copy(src: Path, dest: Path) -> Path:
    """`src` with its window opened: the same weight files (hard links, else copies), config.json's
    sliding_window null."""
    if not (dest / "config.json").is_file():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for path in src.iterdir():
            if path.name != "config.json" and path.is_file():
                try:
                    (tmp / path.name).hardlink_to(path)
                except OSError:  # another file system
                    shutil.copy2(path, tmp / path.name)
        config = json.loads((src / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, "sliding_window": None}, indent=2) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def seeded_model(config_class: str, shape: dict[str, Any], tok: Any, seed: int = QWEN_SEED) -> Any:
    """A float32 model of `config_class` (a name in `transformers`) and `shape`, with seeded random weights
    and `tok`'s special ids; embedding (and untied head) rows past the tokenizer's tokens are zero, so
    greedy decoding never picks them."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    config = getattr(transformers, config_class)(**shape, bos_token_id=bos, eos_token_id=tok.eos_token_id,
                                                 pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tok):] = 0.0
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight[len(tok):] = 0.0
    return model


def _ensure_shaped(dest: Path, tokenizer_dir: Path, config_class: str, shape: dict) -> float | None:
    if (dest / "config.json").is_file():
        return None
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = seeded_model(config_class, shape, tok)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "gsmkit_bench.json").write_text(json.dumps({"shape": shape, "seed": QWEN_SEED}) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return time.perf_counter() - start


def machine_rates(threads: int | None = None) -> dict[str, float]:
    """Bytes/s of a large copy (read + write counted) and float32 FLOP/s of a [512 x 896] @ [896 x 4864]
    GEMM, the best of a few repeats."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a = torch.empty(1 << 28, dtype=torch.float32).fill_(1.0)  # 1 GiB
    b = torch.empty_like(a)
    copies = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        copies.append(time.perf_counter() - t)
    x, w = torch.randn(512, 896), torch.randn(896, 4864)
    gemms = []
    for _ in range(20):
        t = time.perf_counter()
        x @ w
        gemms.append(time.perf_counter() - t)
    return {"bandwidth_bytes_per_s": 2 * a.numel() * 4 / min(copies),
            "matmul_flops_per_s": 2 * 512 * 896 * 4864 / min(gemms)}


def model_facts(model_dir: Path) -> dict[str, Any]:
    """Parameter counts from the config: all weights (read once per decode step) and those a prefill
    token multiplies (all but the embedding; the lm head runs for one token per row)."""
    config = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h
    body = layers * per_layer + h
    embed = config["vocab_size"] * h
    total = body + embed * (1 if config.get("tie_word_embeddings") else 2)
    return {"params": total, "body_params": body, "head_params": embed, "weight_bytes": total * 4}


def floor(facts: dict[str, Any], rates: dict[str, float], decode_steps: float, decode_tokens: int,
          prefill_tokens: int) -> dict[str, float]:
    """Seconds no float32 run can beat on this machine: each decode step reads every weight once (at the
    measured bandwidth) or multiplies them for every row (at the measured matmul rate), whichever is
    slower, plus the prefill's FLOPs (2 x body parameters per token) at the matmul rate."""
    read = facts["weight_bytes"] * decode_steps / rates["bandwidth_bytes_per_s"]
    decode_flops = 2 * facts["params"] * decode_tokens / rates["matmul_flops_per_s"]
    prefill = 2 * facts["body_params"] * prefill_tokens / rates["matmul_flops_per_s"]
    return {"weights_read_s": read, "decode_matmul_s": decode_flops, "prefill_s": prefill,
            "floor_s": max(read, decode_flops) + prefill}

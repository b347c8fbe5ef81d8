"""Tiny random models of every family gsmkit claims, built from transformers' own config classes (2 layers,
hidden 64, seeded; Gemma-3 has 6 layers to show its 5 local : 1 global pattern), for the conformance tests.

Windows are 32 positions, shorter than any few-shot prompt the tests build, so a mask that ignores them
changes the output. Weights are drawn at std 0.1 (not the families' own 0.02), so completions depend on the
prompt: at a small init every prompt yields the same text and a mask bug could not show.
"""

from __future__ import annotations

from pathlib import Path

WINDOW = 32
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neo", "gpt_neox")


def family_config(family: str, tokenizer):
    """A transformers config of `family` sized for tests, using `tokenizer`'s vocabulary and special ids."""
    import transformers as t

    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.eos_token_id}
    vocab = len(tokenizer)
    llama_like = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                  "initializer_range": 0.1, "tie_word_embeddings": False, **ids}
    gemma = {**llama_like, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW}
    if family == "llama":
        return t.LlamaConfig(**llama_like)
    if family == "qwen2":
        return t.Qwen2Config(**llama_like, use_sliding_window=False)
    if family == "qwen3":
        return t.Qwen3Config(**llama_like, head_dim=16)
    if family == "mistral":
        return t.MistralConfig(**llama_like, sliding_window=WINDOW)
    if family == "gemma2":
        return t.Gemma2Config(**gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if family == "gemma3":
        return t.Gemma3TextConfig(**{**gemma, "num_hidden_layers": 6})
    if family == "phi3":
        return t.Phi3Config(**llama_like)
    if family == "gpt2":
        return t.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=2048,
                            initializer_range=0.1, **ids)
    if family == "gpt_neo":
        return t.GPTNeoConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4,
                              attention_types=[[["global", "local"], 1]], window_size=WINDOW,
                              max_position_embeddings=2048, initializer_range=0.1, **ids)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=2048, initializer_range=0.1,
                               tie_word_embeddings=False, **ids)
    raise ValueError(f"unknown family {family}")


def build_family_model(out_dir: Path, tokenizer, family: str, seed: int = 0) -> Path:
    """A seeded random `family` model and `tokenizer` saved to `out_dir` with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer), dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

"""What a training step keeps in memory: the response-only chunked loss (`training.loss`, the same loss
and gradients as the model's own `ForCausalLMLoss` without the full-vocabulary logits of every position),
the lean LoRA dropout (`training.lora.lean_dropout`) and the CPU allocator setting (`training.memory`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from gsmkit.training.loss import linear_cross_entropy, response_loss

TOL = 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_the_plain_computation(bias):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (37,))
    params = (h, w, b) if bias else (h, w)
    mine = linear_cross_entropy(h, w, b, y, 8)  # 8 does not divide 37: a short last chunk
    ours = torch.autograd.grad(mine * 0.7, params)
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y, reduction="sum")
    theirs = torch.autograd.grad(plain * 0.7, params)
    assert torch.allclose(mine, plain, rtol=TOL, atol=TOL)
    for a, c in zip(ours, theirs, strict=True):
        assert torch.allclose(a, c, rtol=TOL, atol=TOL)


def _tiny(tie: bool = False, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                         tie_word_embeddings=tie, pad_token_id=0, **extra)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _batch():
    """Two right-padded rows: prompt positions and padding have label -100."""
    torch.manual_seed(1)
    ids = torch.randint(1, 300, (2, 23))
    attn = torch.ones_like(ids)
    attn[1, 17:] = 0
    labels = ids.clone()
    labels[0, :9] = -100  # the prompt
    labels[1, :5] = -100
    labels[1, 17:] = -100  # the padding
    return ids, attn, labels


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    for name, p in peft.named_parameters():  # B != 0, so the LoRA A matrices get gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft


def _loss_and_grads(model, chunk: int):
    ids, attn, labels = _batch()
    n = labels[:, 1:].ne(-100).sum()
    model.train()
    model.zero_grad()
    if chunk:
        loss_fn = response_loss(model, chunk)
        assert loss_fn is not None
        out = model(input_ids=ids, attention_mask=attn)
        assert out.logits.shape[1] == 1  # the full [batch, length, vocab] logits are never made
        loss = loss_fn(out, labels, num_items_in_batch=n)
        loss_fn.remove()
    else:
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=n).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("kind", ["lora", "full", "full-tied"])
def test_response_loss_and_gradients_equal_the_models_own(kind):
    def build():
        model = _tiny(tie=kind == "full-tied")
        return _lora(model) if kind == "lora" else model

    plain_loss, plain_grads = _loss_and_grads(build(), 0)
    loss, grads = _loss_and_grads(build(), 5)
    assert abs(float(loss) - float(plain_loss)) <= TOL
    assert grads.keys() == plain_grads.keys() and grads
    if kind != "lora":
        assert any("lm_head" in k or "embed_tokens" in k for k in grads)  # the head's weight is trained
    for name, g in grads.items():
        assert torch.allclose(g, plain_grads[name], rtol=TOL, atol=TOL), name


def test_the_hooks_change_nothing_outside_training():
    model = _lora(_tiny())
    ids, attn, _ = _batch()
    loss_fn = response_loss(model, 8)
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=attn).logits.shape == (2, 23, 300)
    assert loss_fn.hidden is None
    loss_fn.remove()


@pytest.mark.parametrize("extra", [{"chunk": 0}, {"final_logit_softcapping": 30.0}, {"logits_scaling": 2.0}])
def test_the_models_own_loss_is_kept_where_the_head_is_not_plain(extra):
    chunk = extra.pop("chunk", 8)
    model = _tiny()
    for key, value in extra.items():
        setattr(model.config, key, value)
    assert response_loss(model, chunk) is None


def test_a_lora_wrapped_head_keeps_the_models_own_loss():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    assert response_loss(model, 8) is None


def test_train_sft_logs_the_same_losses_with_and_without_chunks(tmp_path, tiny_model_dir, small_gsm8k, pool):
    """Through the Trainer (num_items_in_batch, gradient accumulation): the logged losses and the adapter
    after 3 steps equal those of the model's own loss."""
    from safetensors.torch import load_file

    from gsmkit.training.config import TrainSettings
    from gsmkit.training.sft import train

    runs = {}
    for chunk in (0, 16):
        out = tmp_path / f"chunk{chunk}"
        train(TrainSettings(model=str(tiny_model_dir), out=out, data=str(small_gsm8k), pool=pool,
                            batch_size=2, grad_accum=2, max_length=128, max_steps=3, logging_steps=1,
                            learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant", lora_r=4,
                            lora_alpha=8, lora_dropout=0.0, loss_chunk=chunk))
        log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
        manifest = json.loads((out / "manifest.json").read_text())
        runs[chunk] = ([r["loss"] for r in log if "loss" in r], load_file(out / "adapter_model.safetensors"),
                       manifest["resolved"]["loss"])
    (plain, plain_w, plain_kind), (mine, mine_w, kind) = runs[0], runs[16]
    assert plain_kind == "the model's own" and kind == "response positions, chunks of 16"
    assert len(mine) == len(plain) == 3
    assert mine == pytest.approx(plain, abs=1e-4)  # the log rounds to 4 significant digits
    for name, w in mine_w.items():
        assert torch.allclose(w, plain_w[name], rtol=1e-4, atol=1e-5), name


def test_lora_dropout_keeps_a_byte_mask_and_is_the_same_dropout():
    """`lean_dropout`: the same inverted dropout (probability, 1 / (1 - p) scaling, off in eval), keeping a
    bool mask for the backward pass instead of nn.Dropout's float noise and input."""
    from peft import LoraConfig, get_peft_model

    from gsmkit.training.lora import lean_dropout

    model = lean_dropout(get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.25,
                                                            task_type="CAUSAL_LM")))
    dropouts = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(type(d) is not torch.nn.Dropout and d.p == 0.25 for d in dropouts)
    drop = dropouts[0].train()
    x = torch.rand(200, 300) + 1.0
    x.requires_grad_(True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = drop(x)
    assert [t.dtype for t in kept] == [torch.bool]  # the mask only
    zero = y == 0
    assert 0.22 < float(zero.float().mean()) < 0.28
    assert torch.allclose(y[~zero], x[~zero] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, (~zero).float() / 0.75)
    assert drop.eval()(x) is x


def test_freed_activations_go_back_to_the_system(tmp_path):
    """After `return_freed_memory`, freed blocks of 4 MB and more leave the resident set; with glibc's own
    growing threshold they stay (so the test fails without the call)."""
    import subprocess
    import sys

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, torch\n"
        "from pathlib import Path\n"
        "def rss():\n"
        "    pages = int(Path('/proc/self/statm').read_text().split()[1])\n"
        "    return pages * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
        "if sys.argv[1] == '1':\n"
        "    from gsmkit.training.memory import return_freed_memory\n"
        "    assert return_freed_memory(torch.device('cpu')) == 4 * 2**20\n"
        "    assert return_freed_memory(torch.device('meta')) is None\n"
        "x = torch.ones(2**21); del x\n"  # one 8 MB block freed: glibc's threshold grows to 8 MB
        "base, big, small = rss(), [], []\n"
        "for _ in range(64):\n"
        "    big.append(torch.ones(2**21)); small.append(torch.ones(1000))\n"  # 8 MB and 4 KB blocks
        "del big\n"
        "print(rss() - base)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    kept = {flag: float(subprocess.run([sys.executable, str(probe), flag], capture_output=True, text=True,
                                       check=True, env=env).stdout.split()[-1]) for flag in ("0", "1")}
    assert kept["0"] > 400  # MB still resident after freeing 512 MB
    assert kept["1"] < 50

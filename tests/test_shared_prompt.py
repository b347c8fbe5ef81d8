"""GRPO's update with each group's prompt computed once (issue 29, check 1): on tiny random Llama and Qwen2
models, LoRA and QLoRA, groups of 2 and 4, completions of unequal length with padding, the shared-prompt
log-probabilities, entropies and every LoRA gradient equal TRL's own unshared computation
(`GRPOTrainer._get_per_token_logps_and_entropies`) within 1e-5 in float32; no segment sees another; a model
the packed mask cannot serve (sliding windows) is refused so TRL's path runs."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from gsmkit.training.shared_prompt import groups_of, packed_batch, packed_logps, unsupported

TEMPERATURE = 0.7
P, C = 10, 6


def _model(path, four_bit: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.trainer import add_fused_lm_head

    kwargs = {"dtype": torch.float32}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False))  # non-zero B: every gradient non-zero
    model.train()
    return model


def _batch(vocab: int, group: int, seed: int = 1):
    """Two prompts (7 and 10 tokens, left-padded to P) x `group` completions of lengths cycling 6, 3, 5, 1
    (right-padded to C), in TRL's layout."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for plen in (7, 10):
        prompt = torch.randint(5, vocab, (plen,), generator=g)
        for i in range(group):
            clen = (6, 3, 5, 1)[i % 4]
            ids = torch.zeros(P + C, dtype=torch.long)
            mask = torch.zeros(P + C, dtype=torch.long)
            ids[P - plen:P], mask[P - plen:P] = prompt, 1
            ids[P:P + clen], mask[P:P + clen] = torch.randint(5, vocab, (clen,), generator=g), 1
            rows.append(ids)
            masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


def _trl(model, ids, mask):
    from trl import GRPOTrainer

    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(autocast=contextlib.nullcontext))
    fn = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__  # past TRL's profiling decorator
    logps, entropies, _ = fn(trainer, model, ids, mask, C, compute_entropy=True)
    return logps, entropies


def _assert_grads_equal(got: dict, want: dict) -> None:
    """Every gradient within 1e-5, relative and absolute, the absolute part on the tensor's own scale: two
    float32 sums of the same terms in another order differ by a few units in the last place of their
    largest terms, so an element near zero in a tensor whose largest gradient is 11 may differ by 2e-5
    (seen for a 4-bit Llama's q_proj; a wrong gradient differs by orders of magnitude more)."""
    assert got.keys() == want.keys()
    for name, grad in want.items():
        atol = 1e-5 * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=atol, msg=name)


def _grads(model, logps, weights):
    model.zero_grad()
    (logps * weights).sum().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("group", [2, 4])
@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prompt_logps_and_lora_gradients_equal_trls(family, four_bit, group, tiny_model_dir,
                                                           tiny_qwen_dir):
    model = _model(tiny_model_dir if family == "llama" else tiny_qwen_dir, four_bit)
    ids, mask = _batch(model.config.vocab_size, group)
    weights = torch.randn(ids.shape[0], C, generator=torch.Generator().manual_seed(2)) * mask[:, P:]
    want, want_entropy = _trl(model, ids, mask)
    want_grads = _grads(model, want, weights)
    got, got_entropy, _ = packed_logps(model, ids, mask, C, compute_entropy=True)
    got_grads = _grads(model, got, weights)
    scored = mask[:, P:].bool()
    torch.testing.assert_close(got[scored], want[scored], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_entropy[scored], want_entropy[scored], rtol=1e-5, atol=1e-5)
    assert len(want_grads) > 8 and all(g.abs().sum() > 0 for g in want_grads.values())
    _assert_grads_equal(got_grads, want_grads)


def test_gradient_checkpointing_changes_nothing(tiny_model_dir):
    """QLoRA runs with gradient checkpointing by default: the packed mask goes through the recomputation."""
    model = _model(tiny_model_dir, four_bit=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ids, mask = _batch(model.config.vocab_size, 4)
    weights = torch.randn(ids.shape[0], C, generator=torch.Generator().manual_seed(3)) * mask[:, P:]
    want_grads = _grads(model, _trl(model, ids, mask)[0], weights)
    got_grads = _grads(model, packed_logps(model, ids, mask, C)[0], weights)
    _assert_grads_equal(got_grads, want_grads)


def test_groups_are_rows_with_the_same_prompt_and_padding():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [5, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    assert groups_of(ids, mask) == [[0, 1, 3], [2]]


def test_no_segment_sees_another_and_each_keeps_trls_positions(tiny_model_dir):
    model = _model(tiny_model_dir, four_bit=False)
    ids, mask = _batch(model.config.vocab_size, 4)
    groups = groups_of(ids[:, :P], mask[:, :P])
    batch = packed_batch(ids, mask, C, groups, torch.float32)
    allowed = batch["attention_mask"][:, 0] == 0
    seg_len = C + 1
    for g, rows in enumerate(groups):
        for i in range(len(rows)):
            a = P - 1 + i * seg_len
            for j in range(len(rows)):
                if i != j:
                    b = P - 1 + j * seg_len
                    assert not allowed[g, a:a + seg_len, b:b + seg_len].any()
            assert batch["position_ids"][g, a:a + seg_len].tolist() == list(range(P - 1, P + C))
    # changing one completion changes no other row's log-probabilities
    with torch.no_grad():
        before, _, _ = packed_logps(model, ids, mask, C)
        changed = ids.clone()
        changed[1, P:] = (changed[1, P:] + 1) % model.config.vocab_size
        after, _, _ = packed_logps(model, changed, mask, C)
    others = [r for r in range(ids.shape[0]) if r != 1]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)
    assert not torch.equal(after[1], before[1])


def test_nothing_to_share_is_left_to_trl(tiny_model_dir):
    model = _model(tiny_model_dir, four_bit=False)
    ids, mask = _batch(model.config.vocab_size, 1)
    assert packed_logps(model, ids, mask, C) is None


def test_sliding_windows_are_refused(family_model_dirs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    assert unsupported(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) is None
    mistral = AutoModelForCausalLM.from_pretrained(family_model_dirs("mistral"))
    assert "sliding-window" in unsupported(mistral)


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_one_grpo_step_is_the_same_step_shared_or_not(tmp_path, tiny_model_dir, small_gsm8k, monkeypatch,
                                                      four_bit):
    """`train grpo`, one step from the same state with the shared prompt and with --no-shared-prompt: the loss
    and every LoRA gradient the optimizer receives equal within 1e-5, and so does the adapter after the step,
    but where Adam's first step (g / (|g| + eps)) turns a gradient of float noise (|g| < 1e-6) into +-lr; the
    manifest says which path ran. With a 4-bit base TRL itself trains the adapter in bfloat16 (GRPOTrainer
    casts a quantized model's trainable parameters), so there the tolerance is bfloat16's; the float32
    equality of the QLoRA computation is `test_shared_prompt_logps_and_lora_gradients_equal_trls`."""
    import json

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from gsmkit.training import callbacks, rewards
    from gsmkit.training.grpo import train_grpo
    from gsmkit.training.grpo_settings import GrpoSettings

    # a random tiny model never answers right: reward the completion's length parity so groups vary
    monkeypatch.setattr(rewards, "correctness", lambda text, _gold, _fmt, _section=None, _opened=False:
                        float(len(text) % 2))
    grads: dict[bool, dict[str, torch.Tensor]] = {}
    real = callbacks.log_callbacks

    def with_grads(*args, **kwargs):
        class Grads(TrainerCallback):
            def on_pre_optimizer_step(self, _args, _state, _control, model=None, **_kw):
                grads[shared] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                 if p.requires_grad}

        return [*real(*args, **kwargs), Grads()]

    monkeypatch.setattr(callbacks, "log_callbacks", with_grads)
    adapters, manifests, logs = {}, {}, {}
    for shared in (True, False):
        out = tmp_path / f"shared-{shared}"
        train_grpo(GrpoSettings(model=str(tiny_model_dir), out=out, data=str(small_gsm8k), train_samples=4,
                                max_steps=1, max_completion_length=10, num_generations=4, prompts_per_step=2,
                                learning_rate=5e-2, lora_r=4, lora_alpha=8, seed=0, load_in_4bit=four_bit,
                                dtype="float32", logging_steps=1, shared_prompt=shared))
        adapters[shared] = load_file(out / "adapter_model.safetensors")
        manifests[shared] = json.loads((out / "manifest.json").read_text())["resolved"]["update"]
        logs[shared] = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    # one step, one micro-batch: the update is the only log-prob computation (the engine's rollout log-probs
    # are not scored again, and beta 0 needs no reference pass), on the path asked for
    assert manifests[True]["shared_prompt"] and manifests[True]["calls"] == {"shared": 1, "unshared": 0}
    assert manifests[False] == {"shared_prompt": False, "unshared_because": "--no-shared-prompt",
                                "calls": {"shared": 0, "unshared": 1}}
    # the shared update runs fewer positions through the model than TRL's rows (2 prompts x 4 completions)
    positions = {k: [r["logps_positions"] for r in v if "logps_positions" in r] for k, v in logs.items()}
    assert positions[True] and 0 < positions[True][0] < positions[False][0]
    tol = {"rtol": 1.6e-2, "atol": 1e-3} if four_bit else {"rtol": 1e-5, "atol": 1e-5}
    loss = {k: [r["loss"] for r in v if "loss" in r] for k, v in logs.items()}
    assert loss[True] and loss[True] == pytest.approx(loss[False], rel=tol["rtol"], abs=tol["atol"])
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 8
    for name, grad in grads[False].items():
        assert grad.dtype == (torch.bfloat16 if four_bit else torch.float32)
        torch.testing.assert_close(grads[True][name], grad, **tol, msg=name)
        key = name.replace(".default.weight", ".weight")
        noise = grad.abs() < (1e-3 if four_bit else 1e-6)
        got, want = adapters[True][key], adapters[False][key]
        torch.testing.assert_close(got[~noise], want[~noise], **tol, msg=key)


def test_trls_own_rollouts_share_the_prompt_too(tmp_path, tiny_model_dir, small_gsm8k):
    """With `--rollouts trl` (TRL's `model.generate`, its left-padded prompts), the update still computes each
    group's prompt once: one step makes one log-prob pass, on the shared path."""
    import json

    from gsmkit.training.grpo import train_grpo
    from gsmkit.training.grpo_settings import GrpoSettings

    out = tmp_path / "trl-rollouts"
    train_grpo(GrpoSettings(model=str(tiny_model_dir), out=out, data=str(small_gsm8k), train_samples=4,
                            max_steps=1, max_completion_length=8, num_generations=4, prompts_per_step=2,
                            lora_r=4, lora_alpha=8, seed=0, dtype="float32", logging_steps=1, rollouts="trl"))
    resolved = json.loads((out / "manifest.json").read_text())["resolved"]
    assert resolved["rollouts"] == "trl"
    assert resolved["update"] == {"shared_prompt": True, "unshared_because": None,
                                  "calls": {"shared": 1, "unshared": 0}}
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    positions = [r["logps_positions"] for r in log if "logps_positions" in r]
    assert positions and positions[0] > 0

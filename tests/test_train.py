"""`gsmkit train sft | qlora` on tiny random models: weights change, loss falls, the few-shot pool never
reaches a batch, resume continues to the same step count, outputs load with PEFT and in `eval gsm8k`."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import ConfigError, ResumeError
from gsmkit.training.collate import PadCollator
from gsmkit.training.config import TrainSettings, resolve_settings
from gsmkit.training.sft import train

runner = CliRunner()


def _settings(model, data, pool, out, **kw) -> TrainSettings:
    base = {"model": str(model), "out": out, "data": str(data), "pool": pool, "batch_size": 4,
            "max_length": 192, "max_steps": 4, "logging_steps": 1, "learning_rate": 5e-3, "warmup_ratio": 0.0,
            "lr_scheduler": "constant", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    base.update(kw)
    return TrainSettings(**base)


def _lora_b_norm(adapter_dir: Path) -> float:
    from safetensors.torch import load_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k)


def test_sft_trains_lora_and_never_sees_the_pool(tmp_path, tiny_model_dir, small_gsm8k, pool, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pool_questions = [json.loads(x)["question"] for x in pool.read_text().splitlines()]
    seen_batches: list[str] = []
    real_call = PadCollator.__call__

    def spy(self, rows):
        batch = real_call(self, rows)
        seen_batches.extend(tok.batch_decode(batch["input_ids"], skip_special_tokens=True))
        return batch

    monkeypatch.setattr(PadCollator, "__call__", spy)
    out = tmp_path / "run"
    result = train(_settings(tiny_model_dir, small_gsm8k, pool, out, max_steps=10, epochs=3.0))
    assert result.steps == 10 and result.removed_fewshot == 4 and result.train_rows == 36
    # every row of every batch is decoded: each is a train row as the chat template renders it (rows over
    # --max-length lose the start of the question), its answer whole, never a pool question; the first epoch
    # (9 steps of 4) shows every row that is not in the pool
    assert len(seen_batches) >= 10 * 4

    def norm(text: str) -> str:
        return " ".join(text.split())

    rows = [json.loads(x) for x in (small_gsm8k / "train.jsonl").read_text().splitlines()]
    rendered = [norm(f"user {r['question']} assistant {r['answer']}") for r in rows
                if r["question"] not in pool_questions]
    assert len(rendered) == 36
    texts = [norm(t) for t in seen_batches]
    for text in texts:
        assert not any(norm(q) in text for q in pool_questions), text
        assert " assistant " in text and any(row.endswith(text) for row in rendered), text
    assert all(any(row.endswith(text) for text in texts) for row in rendered)

    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json", "trainer_log.jsonl",
                 "loss_curve.png", "tokenizer.json"):
        assert (out / name).exists(), name
    assert not (out / "model.safetensors").exists()  # adapter only
    assert _lora_b_norm(out) > 0  # LoRA B starts at zero: non-zero means it trained
    manifest = json.loads((out / "manifest.json").read_text())
    resolved = manifest["resolved"]
    assert resolved["removed_fewshot"] == 4 and len(resolved["removed_fewshot_hashes"]) == 4
    assert manifest["settings"]["k"] == 5 and manifest["command"] == "train sft"
    assert set(manifest["resolved"]["lora_targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}
    assert manifest["resolved"]["lora_module_count"] == 2 * 7  # 2 layers
    log = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][:3] == [1, 2, 3]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, out)  # loads with plain PEFT
    res = runner.invoke(app, ["eval", "gsm8k", "--model", str(tiny_model_dir), "--adapter", str(out),
                              "--data", str(small_gsm8k), "--limit", "2", "--max-new-tokens", "3",
                              "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "predictions.jsonl").exists()


def test_loss_falls_on_a_repeated_batch(tmp_path, tiny_model_dir, small_gsm8k, pool):
    result = train(_settings(tiny_model_dir, small_gsm8k, pool, tmp_path / "r", max_samples=4, max_steps=12,
                             learning_rate=2e-2, group_by_length=False))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "trainer_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert result.steps == 12
    assert losses[-1] < 0.8 * losses[0], losses


def test_qlora_trains_in_4bit(tmp_path, tiny_model_dir, small_gsm8k, pool):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_settings(tiny_model_dir, small_gsm8k, pool, out, mode="qlora", max_steps=3))
    assert result.steps == 3 and _lora_b_norm(out) > 0
    # checkpointing is asked for under the names this transformers and this peft take (no deprecated alias)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "checkpointing" in m and "deprecated" in m]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "train qlora" and manifest["resolved"]["gradient_checkpointing"] is True
    # scoring a QLoRA adapter on full-precision weights is allowed, with a warning that names the fix
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "Q: 2+2?", "response": " 4"}\n')
    common = ["eval", "ppl", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", str(rows)]
    res = runner.invoke(app, [*common, "--out", str(tmp_path / "fp")])
    assert res.exit_code == 0, res.output
    assert "trained on a 4-bit (nf4) base" in res.output and "--load-in-4bit" in res.output
    res = runner.invoke(app, [*common, "--load-in-4bit", "--out", str(tmp_path / "nf4")])
    assert res.exit_code == 0 and "trained on a 4-bit" not in res.output, res.output


def test_resume_reaches_the_same_step_count(tmp_path, tiny_model_dir, small_gsm8k, pool):
    out = tmp_path / "res"
    settings = _settings(tiny_model_dir, small_gsm8k, pool, out, max_steps=6, save_steps=2)

    def crash(step, _total):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(settings, on_step=crash)
    assert (out / "checkpoints" / "checkpoint-2").exists() and not (out / "adapter_config.json").exists()
    res = runner.invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--fewshot-pool", str(pool), "--out", str(out), "--max-steps", "6"])
    assert res.exit_code == 1 and "--resume" in res.output  # an interrupted run is never silently restarted
    with pytest.raises(ResumeError, match="different settings"):  # a resume repeats what shapes the model
        train(_settings(tiny_model_dir, small_gsm8k, pool, out, max_steps=6, save_steps=2, resume=True,
                        learning_rate=1e-3))
    resumed = train(_settings(tiny_model_dir, small_gsm8k, pool, out, max_steps=6, save_steps=2, resume=True))
    assert not (out / "run.json").exists()  # the settings record goes with the finished run's publish
    assert resumed.steps == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["resumed_from"].endswith("checkpoint-2")
    assert _lora_b_norm(out) > 0
    steps = [json.loads(x)["step"] for x in (out / "trainer_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no duplicated log rows after resume


def test_show_masking_previews_and_writes_nothing(tmp_path, tiny_model_dir, small_gsm8k, pool):
    out = tmp_path / "none"
    res = runner.invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--pool", str(pool), "--out", str(out), "--show-masking", "2"])
    assert res.exit_code == 0, res.output
    assert "trained" in res.output and "4 few-shot rows" in res.output
    assert not out.exists()


def test_presets_config_and_flags_layer_in_order(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.001\nepochs: 3\nlora_r: 8\n")
    s = resolve_settings({"model": "m", "out": tmp_path, "lora_r": 32}, cfg, "strong")
    assert (s.k, s.epochs, s.learning_rate, s.lora_r) == (8, 3, 0.001, 32)  # preset < config < flags
    s = resolve_settings({"model": "m", "out": tmp_path}, None, "simple")
    assert (s.k, s.epochs, s.eval_max_new_tokens) == (3, 1.0, 512)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'"):
        resolve_settings({"model": "m", "out": tmp_path}, bad)
    with pytest.raises(ConfigError, match="preset"):
        resolve_settings({"model": "m", "out": tmp_path}, None, "huge")


def test_bad_training_options(tmp_path, tiny_model_dir, small_gsm8k, pool):
    def run(*extra):
        return runner.invoke(app, ["train", *extra, "--model", str(tiny_model_dir),
                                   "--data", str(small_gsm8k),
                                   "--pool", str(pool), "--out", str(tmp_path / "o")])

    res = run("sft", "--sweep-last", "2")
    assert res.exit_code == 2 and "--save-steps" in res.output
    res = run("sft", "--resume")
    assert_clean_failure(res, tmp_path / "o", 1, "no checkpoint")
    res = run("sft", "--target-modules", "nope_proj", "--max-steps", "1")
    assert res.exit_code == 1 and "nope_proj" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    res = runner.invoke(app, ["train", "sft", "--model", str(tiny_model_dir), "--data", str(bad), "--pool",
                              str(pool), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "bad.jsonl:1" in res.output and not (tmp_path / "o2").exists()


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_runs_under_accelerate_launch(tmp_path, tiny_model_dir, small_gsm8k, pool):
    out = tmp_path / "acc"
    cmd = ["accelerate", "launch", "--num_processes", "1", "--cpu", "-m", "gsmkit", "train", "sft", "--model",
           str(tiny_model_dir), "--data", str(small_gsm8k), "--fewshot-pool", str(pool), "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--max-length", "128", "--json"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    assert (out / "adapter_model.safetensors").exists()


def test_config_numbers_presets_and_eval_guard(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: simple\nlearning_rate: 2e-4\nlora_r: '8'\n")  # YAML 1.1 reads 2e-4 as a string
    s = resolve_settings({"model": "m", "out": tmp_path}, cfg)
    assert s.learning_rate == 2e-4 and s.lora_r == 8 and s.k == 3 and s.preset == "simple"
    assert resolve_settings({"model": "m", "out": tmp_path}, cfg, "strong").k == 8  # --preset wins
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match="must be a number"):
        resolve_settings({"model": "m", "out": tmp_path}, bad)
    with pytest.raises(ConfigError, match="training file itself"):
        resolve_settings({"model": "m", "out": tmp_path, "data": "traces.jsonl", "eval_limit": 5})


@pytest.mark.parametrize(("data", "expected"),
                         [("traces.jsonl", "openai/gsm8k"), ("gsm8k_folder", "gsm8k_folder")])
def test_default_pool_is_drawn_from_gsm8k_not_from_a_training_file(tmp_path, monkeypatch, small_gsm8k, data,
                                                                   expected):
    """A traces/prompt-response .jsonl is not where exemplars come from: the default pool is GSM8K train's."""
    import gsmkit.data.gsm8k as gsm8k_mod

    monkeypatch.chdir(tmp_path)  # no ./fewshot_pool.jsonl here
    real = gsm8k_mod.load_gsm8k
    asked = []

    def spy(source, split="test", *_args, **_kwargs):
        asked.append(source)
        return real(small_gsm8k, split)

    monkeypatch.setattr(gsm8k_mod, "load_gsm8k", spy)
    from gsmkit.training.sft import kept_out_pool

    pool = kept_out_pool(TrainSettings(model="m", out=tmp_path / "o", data=data))
    assert asked == [expected] and len(pool.examples) == 8 and expected in pool.origin and pool.path is None


def test_medium_preset_runs_as_documented(tmp_path, tiny_model_dir, small_gsm8k, pool):
    """The medium preset sweeps checkpoints, so it also says how often to save them and what to evaluate."""
    s = resolve_settings({"model": "m", "out": tmp_path / "o", "mode": "qlora", "data": str(small_gsm8k)},
                         None, "medium")
    assert (s.sweep_last, s.save_steps, s.eval_limit, s.k, s.preset) == (3, 200, 200, 5, "medium")
    common = ["--model", str(tiny_model_dir), "--pool", str(pool), "--out", str(tmp_path / "o")]
    res = runner.invoke(app, ["train", "qlora", "--preset", "medium", "--data", str(small_gsm8k), *common,
                              "--show-masking", "1"])  # resolves the settings as a real run does, then exits
    assert res.exit_code == 0, res.output
    # a value the preset set that cannot work here is named with the preset, not as a flag never typed
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "response": "r"}\n')
    res = runner.invoke(app, ["train", "sft", "--preset", "medium", "--data", str(rows), *common])
    assert res.exit_code == 2 and "--preset medium sets --eval-limit 200" in res.output, res.output
    assert "--eval-data" in res.output
    res = runner.invoke(app, ["train", "sft", "--preset", "medium", "--data", str(small_gsm8k), *common,
                              "--save-steps", "0"])
    assert res.exit_code == 2 and "--preset medium sets --sweep-last 3" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_config_keys_are_the_option_names(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fewshot_pool: runs/pool.jsonl\nlr: 1.0e-3\ntarget-modules: [q_proj, v_proj]\n"
                   "dtype: float32\ngradient_checkpointing: false\nmax_samples: '7'\n")
    s = resolve_settings({"model": "m", "out": tmp_path}, cfg)
    assert s.pool == Path("runs/pool.jsonl") and s.learning_rate == 1e-3
    assert s.target_modules == ("q_proj", "v_proj")
    assert s.dtype == "float32" and s.gradient_checkpointing is False and s.max_samples == 7
    assert resolve_settings({"model": "m", "out": tmp_path, "dtype": "bfloat16"}, cfg).dtype == "bfloat16"
    for bad, match in (("mode: qlora\n", "unknown key 'mode'"), ("lora_r: 0\n", "--lora-r must be >= 1"),
                       ("dtype: float8\n", "--dtype")):
        cfg.write_text(bad)
        with pytest.raises(ConfigError, match=match):
            resolve_settings({"model": "m", "out": tmp_path}, cfg)


def test_publish_swaps_the_finished_run_in_whole(tmp_path, monkeypatch):
    from gsmkit.training import outputs

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "adapter_config.json").write_text("{}")
    (out / "trainer_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')

    def save(folder: Path) -> None:
        (folder / "adapter_config.json").write_text("{}")

    def fail(_folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # a failed publish leaves the interrupted run as it was
        outputs.publish_run(out, save, {"manifest.json": fail})
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "trainer_log.jsonl"]
    monkeypatch.setattr(outputs, "publish_folder", lambda _tmp, _out: (_ for _ in ()).throw(OSError("busy")))
    with pytest.raises(OSError, match="busy"):
        outputs.publish_run(out, save, {})
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "adapter_config.json").exists()
    assert outputs.check_run_folder(out, out / "adapter_config.json", True, False).name == "checkpoint-2"
    monkeypatch.undo()
    outputs.publish_run(out, save, {"manifest.json": lambda p: p.write_text("{}")})
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "checkpoints", "manifest.json",
                                                     "trainer_log.jsonl"]
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder or old copy left beside it
    with pytest.raises(ConfigError, match="finished run"):
        outputs.check_run_folder(out, out / "adapter_config.json", False, False)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("x")  # the finished run replaces --out whole: not a folder of other files
    with pytest.raises(ConfigError, match="not a training run"):
        outputs.check_run_folder(other, other / "adapter_config.json", False, False)
    assert outputs.check_run_folder(other, other / "adapter_config.json", False, True) is None


def test_sweep_compares_the_last_checkpoints(tmp_path):
    from gsmkit.training.outputs import sweep_checkpoints

    for step in (2, 4, 6, 10):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    scores = {"checkpoint-4": 0.2, "checkpoint-6": 0.5, "checkpoint-10": 0.5}
    seen = []

    def evaluate(adapter: Path, out: Path) -> dict:
        seen.append((adapter.name, out.relative_to(tmp_path).as_posix()))
        return {"accuracy_strict": scores[adapter.name], "accuracy_flexible": 0.1}

    rows = sweep_checkpoints(tmp_path, 3, evaluate)
    assert seen == [(f"checkpoint-{n}", f"sweep/checkpoint-{n}") for n in (4, 6, 10)]  # by step, not by name
    written = json.loads((tmp_path / "sweep.json").read_text())
    assert written == {"checkpoints": rows, "best": rows[1]}  # a tie goes to the earlier checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "sweep.json"]


def test_train_then_evaluate_the_adapter_and_its_checkpoints(tmp_path, tiny_model_dir, small_gsm8k, pool):
    from gsmkit.recipes import train_and_evaluate

    out = tmp_path / "ev"
    result = train_and_evaluate(_settings(tiny_model_dir, small_gsm8k, pool, out, max_steps=4, save_steps=2,
                                          eval_limit=2, eval_max_new_tokens=3, sweep_last=2, k=2))
    assert result.steps == 4 and result.eval["n"] == 2 and [r["checkpoint"] for r in result.sweep] == [
        "checkpoint-2", "checkpoint-4"]
    for name in ("eval/metrics.json", "sweep/checkpoint-2/predictions.jsonl", "sweep.json",
                 "checkpoints/checkpoint-4/adapter_config.json", "fewshot_pool.jsonl", "adapter_config.json"):
        assert (out / name).exists(), name
    eval_manifest = json.loads((out / "eval" / "manifest.json").read_text())
    assert eval_manifest["settings"]["k"] == 2 and eval_manifest["settings"]["limit"] == 2


def test_low_rank_factors_give_the_best_rank_r_approximation():
    from gsmkit.training.lora_init import low_rank_factors

    g = torch.Generator().manual_seed(0)
    exact = torch.randn(24, 3, generator=g) @ torch.randn(3, 40, generator=g)  # rank 3
    a, b = low_rank_factors(exact, 3, scaling=2.0)
    assert a.shape == (3, 40) and b.shape == (24, 3)
    assert torch.allclose(2.0 * b @ a, exact, atol=1e-4)  # the adapter's scaling is divided out
    noisy = exact + 0.1 * torch.randn(24, 40, generator=g)
    a, b = low_rank_factors(noisy, 2, scaling=0.5)
    u, s, vh = torch.linalg.svd(noisy)
    assert torch.allclose(0.5 * b @ a, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4)  # Eckart-Young optimum


def test_qlora_loftq_starts_closer_to_the_full_precision_model(tmp_path, tiny_model_dir, small_gsm8k, pool):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from gsmkit.training.lora_init import initialise_adapter

    ids = torch.randint(5, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = full(input_ids=ids).logits

    def logits_error(init: bool) -> tuple[float, dict | None]:
        q = _tiny_qlora(tiny_model_dir)
        stats = initialise_adapter(q, str(tiny_model_dir), "loftq") if init else None
        with torch.no_grad():
            return float((q(input_ids=ids).logits - want).abs().mean()), stats

    plain, _ = logits_error(False)
    loftq, stats = logits_error(True)
    assert stats["layers"] == 14 and stats["rel_error_after"] < stats["rel_error_before"]
    assert loftq < plain  # the initial adapter undoes part of the nf4 error

    out = tmp_path / "loftq"
    result = train(_settings(tiny_model_dir, small_gsm8k, pool, out, mode="qlora", max_steps=2,
                             init_lora="loftq"))
    assert result.steps == 2 and _lora_b_norm(out) > 0
    recorded = json.loads((out / "manifest.json").read_text())["resolved"]["lora_init"]
    assert recorded["method"] == "loftq" and recorded["rel_error_after"] < recorded["rel_error_before"]
    with pytest.raises(ConfigError, match="train qlora"):
        _settings(tiny_model_dir, small_gsm8k, pool, tmp_path / "x", init_lora="loftq")  # no nf4 error in sft
    res = runner.invoke(app, ["train", "qlora", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--pool", str(pool), "--init-lora", "svd", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "--init-lora" in res.output and not (tmp_path / "y").exists()


def test_calibrated_factors_minimise_the_output_error():
    from gsmkit.training.lora_init import calibrated_low_rank_factors, low_rank_factors

    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    x = torch.randn(400, 40, generator=g, dtype=f64) * torch.logspace(1, -1, 40, dtype=f64)
    gram = x.T @ x  # inputs with a few dominant directions, as in LLM activations
    exact = torch.randn(24, 3, generator=g, dtype=f64) @ torch.randn(3, 40, generator=g, dtype=f64)
    a, b = calibrated_low_rank_factors(exact, gram, 3, scaling=2.0, damp=1e-9)
    assert torch.allclose(2.0 * b @ a, exact, atol=1e-6)  # a rank-3 error is undone, scaling divided out
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1))  # each component split evenly between B and A

    def out_err(delta):
        return float((x @ delta.T).norm())

    noisy = exact + 0.3 * torch.randn(24, 40, generator=g, dtype=torch.float64)
    a, b = calibrated_low_rank_factors(noisy, gram, 2, scaling=0.5, damp=1e-9)
    cloq = out_err(noisy - 0.5 * b @ a)
    a0, b0 = low_rank_factors(noisy, 2, scaling=0.5)
    # better than LoftQ's SVD in the norm that counts
    assert cloq < out_err(noisy - 0.5 * b0 @ a0) < out_err(noisy)
    for _ in range(20):  # and no other rank-2 correction does better (local perturbations of the optimum)
        db = 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        da = 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
        assert out_err(noisy - 0.5 * (b + db) @ (a + da)) >= cloq - 1e-12
    # with identity-weighted inputs CLoQ is LoftQ (Eckart-Young)
    a, b = calibrated_low_rank_factors(noisy, torch.eye(40, dtype=torch.float64), 2, scaling=1.0, damp=0.0)
    a0, b0 = low_rank_factors(noisy, 2, scaling=1.0)
    assert torch.allclose(b @ a, b0 @ a0, atol=1e-8)


def _tiny_qlora(model_dir: Path, r: int = 8):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gsmkit.modeling import keep_4bit_compute_dtype

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=bnb,
                                             device_map={"": "cpu"})
    keep_4bit_compute_dtype(q)  # float32 compute in every variant compared, as gsmkit's loader sets it
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(q, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))


def _encoded_rows(model_dir: Path, data: Path, n: int):
    from gsmkit.modeling import load_tokenizer
    from gsmkit.training.data import load_train_examples
    from gsmkit.training.masking import encode_example

    tok = load_tokenizer(str(model_dir))
    return [encode_example(ex, tok, "chat", 192) for ex in load_train_examples(data, "train")[:n]], tok


def test_calibration_grams_are_the_layer_inputs_without_padding(tiny_model_dir, small_gsm8k):
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import Linear4bit

    from gsmkit.training.lora_init import collect_grams

    model = _tiny_qlora(tiny_model_dir).eval()
    rows, tok = _encoded_rows(tiny_model_dir, small_gsm8k, 11)  # batches of 8 and 3, padded
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    want = {n: torch.zeros(m.in_features, m.in_features) for n, m in layers}

    def manual(name):
        def hook(_module, inputs):
            want[name] += sum(inputs[0][i, :n].T @ inputs[0][i, :n] for i, n in enumerate(lengths))
        return hook

    handles = [m.register_forward_pre_hook(manual(n)) for n, m in layers]
    with torch.no_grad():
        for start in (0, 8):
            chunk = rows[start:start + 8]
            lengths = [len(r.input_ids) for r in chunk]
            batch = PadCollator(tok.pad_token_id)([{"input_ids": r.input_ids, "labels": r.labels}
                                                   for r in chunk])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    grams, tokens = collect_grams(model, layers, rows, tok.pad_token_id)
    assert tokens == sum(len(r.input_ids) for r in rows)
    for name, _ in layers:
        assert torch.allclose(grams[name], want[name], rtol=1e-4, atol=1e-3), name
    # a pass over only the first layers stops early and gets the same matrices
    first, _ = collect_grams(model, layers[:3], rows, tok.pad_token_id)
    assert all(torch.equal(first[n], grams[n]) for n, _ in layers[:3])


def test_qlora_cloq_starts_closest_to_the_full_precision_model(tmp_path, tiny_model_dir, small_gsm8k, pool):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from gsmkit.training.lora_init import initialise_adapter

    rows, tok = _encoded_rows(tiny_model_dir, small_gsm8k, 40)
    calibration, held_out = rows[:24], rows[24:]
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = PadCollator(tok.pad_token_id)([{"input_ids": r.input_ids, "labels": r.labels} for r in held_out])
    with torch.no_grad():
        want = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()

    def logits_error(method: str | None, **kw) -> tuple[float, dict | None]:
        q = _tiny_qlora(tiny_model_dir)
        stats = None
        if method:
            stats = initialise_adapter(q, str(tiny_model_dir), method, calibration, tok.pad_token_id, **kw)
        assert q.training  # initialising leaves the model in training mode
        q.eval()
        with torch.no_grad():
            got = q(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float((got - want)[keep].abs().mean()), stats

    plain, _ = logits_error(None)
    loftq, _ = logits_error("loftq")
    cloq, stats = logits_error("cloq")
    assert cloq < loftq < plain  # on held-out rows, not only on the calibration rows
    assert stats["calibration_rows"] == 24 and stats["layers"] == 14
    assert stats["rel_output_error_after"] < 0.7 * stats["rel_output_error_before"]
    seen = []  # a budget of one byte: 14 passes
    sequential, stats = logits_error("cloq", gram_budget=1, on_progress=lambda *a: seen.append(a))
    assert sequential < loftq and stats["rel_output_error_after"] < stats["rel_output_error_before"]
    assert seen[-1] == ("initialising", 14, 14) and ("calibrating", 14 * 3, 14 * 3) in seen  # 3 batches/pass

    out = tmp_path / "cloq"
    result = train(_settings(tiny_model_dir, small_gsm8k, pool, out, mode="qlora", max_steps=2,
                             init_lora="cloq", calibration_rows=16))
    assert result.steps == 2 and _lora_b_norm(out) > 0
    recorded = json.loads((out / "manifest.json").read_text())["resolved"]["lora_init"]
    assert recorded["method"] == "cloq" and recorded["calibration_rows"] == 16
    assert recorded["rel_output_error_after"] < recorded["rel_output_error_before"]
    # on full-precision weights the adapter's nf4 correction is named in the warning
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "Q: 2+2?", "response": " 4"}\n')
    res = runner.invoke(app, ["eval", "ppl", "--model", str(tiny_model_dir), "--adapter", str(out),
                              "--data", str(rows),
                              "--out", str(tmp_path / "fp")])
    assert res.exit_code == 0, res.output
    assert "--init-lora cloq" in res.output and "--load-in-4bit" in res.output, res.output
    with pytest.raises(ConfigError, match="train qlora"):
        _settings(tiny_model_dir, small_gsm8k, pool, tmp_path / "x", init_lora="cloq")
    with pytest.raises(ConfigError, match="calibration-rows"):
        _settings(tiny_model_dir, small_gsm8k, pool, tmp_path / "x", mode="qlora", init_lora="cloq",
                  calibration_rows=0)


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("recipe", ["sft", "grpo"])
def test_a_bad_data_file_fails_before_the_tokenizer_loads(tmp_path, recipe):
    # the data is checked before anything loads (a Hub model would otherwise be reached for first)
    from gsmkit.errors import DataError
    from gsmkit.training.config import TrainSettings
    from gsmkit.training.grpo import GrpoSettings, train_grpo
    from gsmkit.training.sft import train

    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"question": "q"}\n')
    run, settings = (train, TrainSettings) if recipe == "sft" else (train_grpo, GrpoSettings)
    with pytest.raises(DataError, match="rows.jsonl:1"):
        run(settings(model="some/hub-model", out=tmp_path / "out", data=str(bad)))
    assert not (tmp_path / "out").exists()


def test_overwrite_never_replaces_a_folder_that_holds_the_runs_inputs(tmp_path, small_gsm8k, pool):
    out = tmp_path / "runs"
    out.mkdir()
    data = out / "train.jsonl"
    data.write_text((small_gsm8k / "train.jsonl").read_text())
    with pytest.raises(ConfigError, match="would replace the input"):
        train(_settings("some/hub-model", data, pool, out, overwrite=True))
    assert data.exists()

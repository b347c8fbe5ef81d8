"""Run folders for the study tests, written by gsmkit's own writers (settings, manifests, metrics summaries,
the run-folder publish), with the outcomes a test chooses instead of a model's.

`eval_gsm8k_run(out, correct, ...)`: an `eval gsm8k` folder whose predictions have the given correctness;
`eval_safety_run(out, labels, ...)`: an `eval safety` folder with those verdicts; `train_run(out, ...)`: a
finished `train sft|qlora|grpo` folder with a small adapter (and checkpoints, a sweep) whose sha256 the
evaluations can name.
"""

from __future__ import annotations

import json
from pathlib import Path

from gsmkit.evaluation.gsm8k import EvalSettings, summarize
from gsmkit.evaluation.safety import SafetySettings, summarize_safety
from gsmkit.jsonl import write_json
from gsmkit.manifest import build_manifest
from gsmkit.modeling import ModelSpec
from gsmkit.records import Prediction
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer
from gsmkit.training.config import TrainSettings

MODEL = "tiny/model"


def eval_gsm8k_run(out: Path, correct: list[bool], *, adapter: Path | None = None,
                   flexible: list[bool] | None = None, ids: list[str] | None = None,
                   golds: list[str] | None = None, model: str = MODEL, k: int = 5,
                   style: str = "plain") -> Path:
    """An `eval gsm8k` folder: problem i is right (strict) when correct[i]; flexible defaults to strict."""
    flexible = flexible if flexible is not None else correct
    ids = ids or [f"gsm8k-{i:04d}" for i in range(len(correct))]
    golds = golds or [str(i) for i in range(len(correct))]
    preds = []
    for pid, gold, ok, flex in zip(ids, golds, correct, flexible, strict=True):
        answer = gold if ok else f"{gold}1"
        preds.append(Prediction(id=pid, prompt_sha256="0" * 64, completion=f"#### {answer}",
                                strict=answer, flexible=gold if flex else f"{gold}1", gold=gold,
                                correct_strict=ok, correct_flexible=flex, num_prompt_tokens=10, num_tokens=3,
                                finish_reason="stop"))
    settings = EvalSettings(model=ModelSpec(model=model, adapter=str(adapter) if adapter else None),
                            data="data/gsm8k", out=out, limit=len(correct), k=k, style=style,
                            pool=Path("pool.jsonl") if k else None)
    metrics = summarize(preds, k, style, {"generation_s": 1.0, "generated_this_run": len(preds),
                                          "tokens_this_run": 3 * len(preds), "wall_s": 1.0, "engine": {}})
    manifest = build_manifest("eval gsm8k", settings, seeds={"seed": 0}, extra={"resolved": {"style": style}})
    output = RunOutput.folder(out, finals=("predictions.jsonl", "metrics.json"))
    output.publish({"predictions.jsonl": jsonl_writer(p.to_dict() for p in preds),
                    "metrics.json": json_writer({**metrics.to_dict(), "manifest": manifest}),
                    MANIFEST: json_writer(manifest)})
    return out


def eval_safety_run(out: Path, labels: list[str], *, adapter: Path | None = None, model: str = MODEL) -> Path:
    """An `eval safety` folder whose verdicts are `labels` (safe, unsafe, unparsed)."""
    responses = [{"id": f"p{i}", "finish_reason": "stop", "num_prompt_tokens": 5, "num_tokens": 5}
                 for i in range(len(labels))]
    verdicts = [{"id": f"p{i}", "label": label, "categories": [], "hazard": "vcr", "hazard_group": "vcr",
                 "persona": "normal"} for i, label in enumerate(labels)]
    metrics = summarize_safety(responses, verdicts, "classifier", "chat", None, {})
    settings = SafetySettings(model=ModelSpec(model=model, adapter=str(adapter) if adapter else None),
                              prompts=Path("prompts.csv"), safeguard_model=Path("guard"),
                              safety_prompt=Path("guidelines.txt"), out=out)
    manifest = build_manifest("eval safety", settings, seeds={"seed": 0})
    from dataclasses import asdict

    output = RunOutput.folder(out, finals=("safety.jsonl", "metrics.json"))
    output.publish({"safety.jsonl": jsonl_writer(verdicts),
                    "metrics.json": json_writer({**asdict(metrics), "manifest": manifest}),
                    MANIFEST: json_writer(manifest)})
    return out


def _adapter(folder: Path, r: int, salt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"r": r, "lora_alpha": 2 * r, "peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    import hashlib

    import numpy as np
    from safetensors.numpy import save_file

    digest = np.frombuffer(hashlib.sha256(salt.encode()).digest(), dtype=np.float32).copy()
    weights = {"base_model.model.x.lora_A.weight": digest.reshape(1, -1)}
    save_file(weights, str(folder / "adapter_model.safetensors"))


def train_run(out: Path, *, command: str = "train qlora", preset: str | None = None, seed: int = 42,
              lora_r: int = 16, checkpoints: tuple[int, ...] = (), sweep: bool = False,
              losses: tuple[float, ...] = (2.0, 1.5, 1.2), train_rows: int = 64, **overrides) -> Path:
    """A finished training folder: adapter files (distinct per folder), manifest, trainer log, checkpoints."""
    mode = command.split()[-1]
    settings = TrainSettings(model=MODEL, out=out, mode=mode if mode in ("sft", "qlora") else "sft",
                             preset=preset, seed=seed, lora_r=lora_r, max_steps=len(losses),
                             **({"save_steps": 1, "sweep_last": len(checkpoints), "eval_limit": 4} if sweep
                                else {}), **overrides)
    _adapter(out, lora_r, str(out))
    for step in checkpoints:
        _adapter(out / "checkpoints" / f"checkpoint-{step}", lora_r, f"{out}/{step}")
    with (out / "trainer_log.jsonl").open("w") as fh:
        for step, loss in enumerate(losses, 1):
            fh.write(json.dumps({"step": step, "epoch": step / len(losses), "loss": loss}) + "\n")
        fh.write(json.dumps({"step": len(losses), "train_loss": sum(losses) / len(losses)}) + "\n")
    if sweep:
        write_json(out / "sweep.json", {"checkpoints": [], "best": None})
    manifest = build_manifest(command, settings, seeds={"seed": seed},
                              extra={"resolved": {"train_rows": train_rows, "steps": len(losses)}})
    write_json(out / MANIFEST, manifest)
    return out

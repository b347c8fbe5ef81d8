"""The GPU check: one command that runs the CUDA paths gsmkit has not run yet and writes one JSON of figures.

Made for the day a GPU is lent (at most ~8 minutes on one H100); on a CPU it runs the same steps at tiny
sizes, so it is known to work before a GPU ever sees it. It needs no Hub access and no ../shared data: it
writes a small GSM8K-style dataset (train.jsonl, test.jsonl of {question, answer ending in '#### n'}) and
trains a byte-level BPE tokenizer on it, both with the tests' builders (tests/synthetic.py), and builds its
models with seeded random weights. It installs nothing: a step whose packages or device are missing is
skipped, and says why.

Steps, in order; each records ok / skipped (why) / failed (the error, one line), its seconds and figures:
1. setup: the data, the tokenizer, the models, and the few-shot pool (`gsmkit fewshot`).
2. engine bf16: gsmkit's engine (`build_engine`: `HFEngine`, batched, shared prefix) against transformers'
   `generate` (one prompt at a time), greedy, bfloat16, on a model of Qwen2.5-0.5B's shape (weights at
   std 0.05, so that completions depend on the prompt): completions identical to generate's, and where
   they differ, whether the first differing token was decided by rounding; every token of both tools'
   completions scored by one transformers forward pass (the greedy choice, within `ROUNDING_ULPS` of it,
   or beyond); tokens/s of both.
3. engine sliding window: the same on a Mistral-shaped model whose 64-position window is shorter than
   every prompt; also how many completions change when the window is opened (so the check would see a
   window that is not applied).
4. train qlora: `gsmkit train qlora` (bitsandbytes nf4) for a few steps; without CUDA on bitsandbytes'
   CPU backend, so its CUDA kernels are what only a GPU run checks.
5. train grpo: one `gsmkit train grpo` step (TRL; rollouts by gsmkit's engine).
6. merge: `gsmkit merge` of the QLoRA adapter (else the GRPO one); its verification gate must pass.
7. backend parity: `benchmarks/backend_parity.py` (`eval gsm8k --backend hf` against `--backend vllm`),
   where vLLM is installed and a CUDA device is present.
Full sizes: the two models above, 12 prompts of 3 exemplars, 64 new tokens; QLoRA, GRPO and merge on
the 0.5B shape. --tiny: 2-layer models of hidden 64, 6 prompts, 24 new tokens.
The engine steps run in a child process of this script, the others as `python -m gsmkit ...`, as users
run them; each under a timeout. A table is printed; the exit code is 0 if no step failed, 1 otherwise.

    python benchmarks/gpu_check.py --out gpu_check.json           # on a GPU machine
    python benchmarks/gpu_check.py --tiny --out gpu_check.json    # tiny sizes (implied without CUDA)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, TIMED_OUT, load_test_module, machine_info, package_version, run_timed, tail
from _decode_floor import QWEN_SHAPE, opened_window_copy, seeded_model

STEPS = ("setup", "engine_bf16", "engine_sliding_window", "train_qlora", "train_grpo", "merge",
         "backend_parity")
WINDOW = 64
SEED = 0
SYNTHETIC = load_test_module("synthetic")  # the tests' GSM8K-shaped data and tiny tokenizer
# Local files only: a Hub lookup would hang where nothing outside the machine can be reached.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# Qwen2.5-0.5B's shape (benchmarks/_decode_floor.py) at init std 0.05: at the family's own 0.02 every
# prompt gives the same text, and an agreement check could not see a wrong mask or position.
QWEN = {**QWEN_SHAPE, "initializer_range": 0.05}
# Mistral-7B's proportions (head size 128, 4 query heads per KV head, MLP 3.5x hidden, untied head, 32,000
# tokens) at 16 layers of hidden 1024, so that it builds in seconds; the window is shorter than any prompt.
MISTRAL = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 16,
           "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
           "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "sliding_window": WINDOW, "initializer_range": 0.05}
# --tiny: 2 layers of hidden 64 (as tests/family_models.py), the tokenizer's own vocabulary, std 0.1.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "initializer_range": 0.1,
        "tie_word_embeddings": False}
SIZES = {  # per mode: generation, training and evaluation sizes
    "full": {"prompts": 12, "shots": 3, "new_tokens": 64, "qlora_steps": 4, "qlora_batch": 4,
             "max_length": 256, "lora_r": 16, "grpo_generations": 4, "grpo_tokens": 64, "verify": 8,
             "parity_limit": 32, "parity_tokens": 64},
    "tiny": {"prompts": 6, "shots": 2, "new_tokens": 24, "qlora_steps": 3, "qlora_batch": 2,
             "max_length": 128, "lora_r": 4, "grpo_generations": 2, "grpo_tokens": 12, "verify": 4,
             "parity_limit": 8, "parity_tokens": 16},
}
TIMEOUTS = {"setup": 120, "engine_bf16": 150, "engine_sliding_window": 150, "train_qlora": 180,
            "train_grpo": 240, "merge": 180, "backend_parity": 300}  # seconds, full sizes; --tiny: 600 each
# A completion token whose logit is within this many units in the last place (ulps) of the top logit, in
# the model's dtype, is the greedy choice up to rounding. Measured on Qwen2.5-0.5B's shape in bfloat16 on a
# CPU (64 tokens): the engine's tokens were up to 11 ulps below a forward pass's top logit (its shared-prefix
# attention rounds two partial outputs; 3 without it), generate's up to 2; with a sliding window ignored
# they were 200-400 ulps below, at every token.
ROUNDING_ULPS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON written (and rewritten "
                   "after every step, so a killed run leaves what it finished); default gpu_check.json")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models and sizes (implied without a CUDA device)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds each step may take (default: per step, 120-300 s; 600 s with --tiny)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run: a step that would "
                   "start with under 20 s left is skipped, and none runs past it (default: 480 at full "
                   "size, none with --tiny)")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the data, models, run folders and logs here (default: a temporary folder, "
                   "removed at the end)")
    p.add_argument("--engine-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# the data, the tokenizer and the models


def build_model(dest: Path, tok, family: str, shape: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A seeded random `family` model saved with `tok` at `dest`; embedding (and head) rows past the
    tokenizer's tokens are zero, so they are never chosen. Returns its facts."""
    import torch

    config_class = {"qwen2": "Qwen2Config", "mistral": "MistralConfig"}[family]
    shape = {"vocab_size": len(tok), **shape}
    if family == "qwen2":
        shape.setdefault("use_sliding_window", False)
    model = seeded_model(config_class, shape, tok, SEED)
    params = sum(p.numel() for p in model.parameters())
    model.to(getattr(torch, dtype)).save_pretrained(dest)
    tok.save_pretrained(dest)
    return {"family": family, "layers": shape["num_hidden_layers"], "hidden": shape["hidden_size"],
            "heads": shape["num_attention_heads"], "kv_heads": shape["num_key_value_heads"],
            "vocab": shape["vocab_size"], "parameters": params, "init_std": shape["initializer_range"],
            "sliding_window": shape.get("sliding_window"), "saved_dtype": dtype}


def few_shot_prompts(rows: list[dict[str, str]], shots: int, n: int) -> list[str]:
    """`n` plain-style prompts sharing a `shots`-exemplar prefix (the engine finds and shares it)."""
    prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:shots])
    return [prefix + f"Question: {r['question']}\nAnswer:" for r in rows[shots:shots + n]]


# ---------------------------------------------------------------------------------------------------
# the engine against transformers' generate (run in a child process: --engine-worker SPEC)


def engine_worker(spec_path: Path) -> int:
    """Read the spec, compare the engine with `generate`, write the figures to spec["figures"]."""
    import torch

    from gsmkit.generation import GenRequest, SamplingSettings, build_engine, describe_device
    from gsmkit.modeling import ModelSpec, cpu_supports_bf16

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    notes = []
    dtype = spec["dtype"]
    if dtype == "bfloat16" and not torch.cuda.is_available() and not cpu_supports_bf16():
        dtype = "float32"
        notes.append("this CPU has no native bfloat16 (AVX512-BF16 or AMX): compared in float32")
    loaded, tok, engine = build_engine(ModelSpec(model=spec["model"], dtype=dtype))
    model = loaded.model
    device = next(model.parameters()).device
    requests = [GenRequest(str(i), tuple(tok(p).input_ids)) for i, p in enumerate(spec["prompts"])]
    lengths = [len(r.prompt_ids) for r in requests]
    n_new = spec["new_tokens"]
    stops = sorted(engine.stop_token_ids)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_engine(eng) -> tuple[dict[str, list[int]], float]:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            res = {r.key: [*r.token_ids, *([r.end_token] if r.end_token is not None else [])]
                   for r in eng.generate(requests, SamplingSettings(max_new_tokens=n_new))}
        sync()
        return res, time.perf_counter() - start

    def reference(ids: tuple[int, ...], new_tokens: int = n_new) -> list[int]:
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=stops or None, pad_token_id=tok.pad_token_id)
        return out[0, len(ids):].tolist()

    # warm-up outside both timings (kernels, allocator, the engine's attention registration)
    reference(requests[0].prompt_ids[:16], 2)
    with torch.inference_mode():
        list(engine.generate(requests[:1], SamplingSettings(max_new_tokens=2)))
    before = dict(engine.stats)
    got, engine_s = run_engine(engine)
    stats = {k: v - before.get(k, 0) for k, v in engine.stats.items()}
    sync()
    start = time.perf_counter()
    ref = {r.key: reference(r.prompt_ids) for r in requests}
    sync()
    generate_s = time.perf_counter() - start

    # One forward pass over each prompt + a completion (transformers' own attention and masks): each
    # completion token's logit below the top one, in units in the last place (ulps) of the top logit.
    # generate's own completions get the same check: how far transformers is from itself in this dtype.
    eps = torch.finfo(model.dtype).eps if model.dtype.is_floating_point else torch.finfo(torch.float32).eps

    def scored(prompt_ids: tuple[int, ...], path: list[int]):
        x = torch.tensor([[*prompt_ids, *path]], device=device)
        with torch.inference_mode():
            logits = model(input_ids=x).logits[0, len(prompt_ids) - 1:-1].float()
        top = logits.max(-1).values
        ulps = eps * torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-6))))
        chosen = logits[torch.arange(len(path), device=device), torch.tensor(path, device=device)]
        gaps = ((top - chosen) / ulps).tolist()
        return logits, top, ulps, gaps

    divergences, gaps, ref_gaps = [], [], []
    for r in requests:
        a, b = got[r.key], ref[r.key]
        if b:
            ref_gaps += scored(r.prompt_ids, b)[3]
        if not a:
            continue
        logits, top, ulps, row_gaps = scored(r.prompt_ids, a)
        gaps += row_gaps
        if a == b:
            continue
        at = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
        row = {"prompt": int(r.key), "position": at, "engine_token": a[at] if at < len(a) else None,
               "generate_token": b[at] if at < len(b) else None, "rounding": False}
        if row["engine_token"] is not None and row["generate_token"] is not None:
            gap = abs(float(logits[at, row["engine_token"]] - logits[at, row["generate_token"]]))
            row.update(logit_gap=gap, top_logit=float(top[at]), gap_ulps=gap / float(ulps[at]),
                       rounding=gap <= ROUNDING_ULPS * float(ulps[at]))
        divergences.append(row)  # no differing token (one stopped, one went on): no rounding
    beyond = sum(g > ROUNDING_ULPS for g in gaps)

    def checked(values: list[float]) -> dict[str, Any]:
        return {"tokens": len(values), "argmax": sum(g == 0 for g in values),
                "within_rounding": sum(0 < g <= ROUNDING_ULPS for g in values),
                "beyond_rounding": sum(g > ROUNDING_ULPS for g in values),
                "max_gap_ulps": max(values, default=0.0), "rounding_ulps": ROUNDING_ULPS}

    engine_tokens = sum(len(v) for v in got.values())
    ref_tokens = sum(len(v) for v in ref.values())
    figures: dict[str, Any] = {
        "model": spec["facts"], "dtype": dtype, **describe_device(device),
        "prompts": len(requests), "prompt_tokens_min": min(lengths), "prompt_tokens_max": max(lengths),
        "new_tokens": n_new,
        "engine": {"seconds": engine_s, "tokens": engine_tokens, "tokens_per_s": engine_tokens / engine_s,
                   "batch_size": engine.batch_size, "stats": stats,
                   "attention": engine.describe().get("attention")},
        "generate": {"seconds": generate_s, "tokens": ref_tokens, "tokens_per_s": ref_tokens / generate_s,
                     "batch_size": 1},
        "identical": len(requests) - len(divergences),
        "divergences": divergences,
        "engine_tokens_checked": checked(gaps),
        "generate_tokens_checked": checked(ref_gaps),
        "agreement": beyond == 0 and all(d["rounding"] for d in divergences),
        "distinct_completions": len({tuple(v) for v in got.values()}),
        "notes": notes,
    }
    if spec.get("opened_model"):  # the same weights without the window: does the window change the text?
        _, _, opened = build_engine(ModelSpec(model=spec["opened_model"], dtype=dtype))
        wide, _ = run_engine(opened)
        figures["window"] = spec["facts"]["sliding_window"]
        figures["window_changes_completions"] = sum(wide[k] != got[k] for k in got)
    Path(spec["figures"]).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------------------------------
# the check


class Check:
    """The run: its steps' records, written to --out after each one."""

    def __init__(self, args: argparse.Namespace, work: Path):
        import torch

        self.cuda = torch.cuda.is_available()
        self.tiny = args.tiny or not self.cuda
        self.mode = "tiny" if self.tiny else "full"
        self.sizes = SIZES[self.mode]
        self.out = args.out.resolve()
        self.work = work
        self.timeout = args.timeout
        budget = args.budget if args.budget is not None else (None if self.tiny else 480.0)
        self.started = time.perf_counter()
        self.deadline = None if budget is None else self.started + budget
        self.notes: list[str] = []
        if not self.cuda:
            self.notes.append("no CUDA device: ran at tiny sizes on cpu")
        elif self.tiny:
            self.notes.append("--tiny: tiny sizes on the CUDA device")
        device = {"cuda": self.cuda, "torch_cuda": torch.version.cuda}
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            device.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                          count=torch.cuda.device_count())
        packages = {name: package_version(name) for name in
                    ("peft", "trl", "accelerate", "bitsandbytes", "vllm", "tokenizers")}
        self.result: dict[str, Any] = {
            "check": "gpu_check", "command": [sys.executable, *sys.argv], "mode": self.mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_state(),
            "device": device, "machine": {**machine_info(), **packages}, "notes": self.notes,
            "steps": {name: {"status": "pending"} for name in STEPS},
        }
        self.model_dirs: dict[str, Path] = {}
        self.facts: dict[str, dict[str, Any]] = {}
        self.adapters: dict[str, Path] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------

    def record(self, name: str, status: str, seconds: float | None = None, figures: dict | None = None,
               why: str | None = None, summary: str = "", log: Path | None = None) -> None:
        entry: dict[str, Any] = {"status": status, "seconds": None if seconds is None else round(seconds, 2)}
        if status == "skipped":
            entry["reason"] = why
        if status == "failed":
            entry["error"] = why
            if log is not None and log.is_file():
                entry["log_tail"] = tail(log, 25).splitlines()
        entry["summary"] = summary or (why if status != "ok" else "")
        entry["figures"] = figures or {}
        self.result["steps"][name] = entry
        self.save()

    def save(self) -> None:
        self.result["wall_s"] = round(time.perf_counter() - self.started, 1)
        counts = {s: sum(e["status"] == s for e in self.result["steps"].values())
                  for s in ("ok", "skipped", "failed")}
        self.result["summary"] = counts
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.out)

    def step(self, name: str, fn, *args: Any, **kwargs: Any) -> None:
        """Run one step; an error of this script's own (reading what a command wrote) fails only it."""
        start = time.perf_counter()
        try:
            fn(name, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - recorded; the other steps still run
            self.record(name, "failed", time.perf_counter() - start, why=one_line(err))

    def limit(self, name: str) -> float | None:
        """Seconds step `name` may run: its timeout, cut to what is left of the budget; None: skip it."""
        seconds = self.timeout or (600.0 if self.tiny else float(TIMEOUTS[name]))
        if self.deadline is not None:
            left = self.deadline - time.perf_counter()
            if left < 20:
                return None
            seconds = min(seconds, left)
        return seconds

    def run(self, name: str, cmd: list[str]) -> tuple[float, int, Path] | None:
        """Run one step's command under its limit; None (and the step skipped) when the budget is spent."""
        seconds = self.limit(name)
        if seconds is None:
            self.record(name, "skipped", why="the run's --budget was spent before this step")
            return None
        print(f"{name}: running (log: {self.work / 'logs' / (name + '.log')})", flush=True)
        log = self.work / "logs" / f"{name}.log"
        wall, code = run_timed(cmd, log, ENV, timeout=seconds)
        if code == TIMED_OUT:
            self.record(name, "failed", wall, why=f"timed out after {seconds:.0f} s", log=log)
        elif code != 0:
            self.record(name, "failed", wall, why=f"exit code {code}: {error_line(log)}", log=log)
        return wall, code, log

    # -- the steps -----------------------------------------------------------------------------------

    def setup(self) -> bool:
        start = time.perf_counter()
        try:
            rows = SYNTHETIC.write_gsm8k(self.work / "data", 64, 32, seed=SEED)
            tok = SYNTHETIC.build_tokenizer(self.work / "tokenizer", SYNTHETIC.tokenizer_texts(rows))
            if self.tiny:
                shapes = {"qwen": ("qwen2", TINY), "mistral": ("mistral", {**TINY, "sliding_window": WINDOW})}
                dtype = "float32"
            else:
                shapes = {"qwen": ("qwen2", QWEN), "mistral": ("mistral", MISTRAL)}
                dtype = "bfloat16"
            for key, (family, shape) in shapes.items():
                self.model_dirs[key] = self.work / "models" / key
                self.facts[key] = build_model(self.model_dirs[key], tok, family, shape, dtype)
            self.model_dirs["mistral_opened"] = opened_window_copy(self.model_dirs["mistral"],
                                                                   self.work / "models" / "mistral-opened")
        except Exception as err:  # noqa: BLE001 - the check reports it and goes on to say what it could not do
            self.record("setup", "failed", time.perf_counter() - start, why=one_line(err))
            return False
        self.pool = self.work / "pool.jsonl"
        done = self.run("setup", [*GSMKIT, "fewshot", "--data", str(self.work / "data"), "--n", "8",
                                  "--out", str(self.pool)])
        if done is None or done[1] != 0:
            return False
        self.prompts = few_shot_prompts(rows, self.sizes["shots"], self.sizes["prompts"])
        figures = {"train_rows": 64, "test_rows": 32, "tokenizer_vocab": len(tok), "models": self.facts,
                   "pool": 8, "build_s": round(time.perf_counter() - start - done[0], 2)}
        self.record("setup", "ok", time.perf_counter() - start, figures,
                    summary=f"{len(tok)}-token tokenizer; " + ", ".join(
                        f"{k}: {f['family']} {f['parameters'] / 1e6:.1f}M" for k, f in self.facts.items()))
        return True

    def engine(self, name: str, key: str, opened: str | None = None) -> None:
        spec = {"model": str(self.model_dirs[key]), "dtype": "bfloat16", "prompts": self.prompts,
                "new_tokens": self.sizes["new_tokens"], "facts": self.facts[key],
                "opened_model": str(self.model_dirs[opened]) if opened else None,
                "figures": str(self.work / f"{name}.json")}
        spec_path = self.work / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        done = self.run(name, [sys.executable, str(Path(__file__).resolve()), "--engine-worker",
                               str(spec_path)])
        if done is None or done[1] != 0:
            return
        fig = json.loads(Path(spec["figures"]).read_text(encoding="utf-8"))
        n, checked = fig["prompts"], fig["engine_tokens_checked"]
        summary = (f"{fig['dtype']}: {fig['identical']}/{n} = generate; engine tokens {checked['argmax']} "
                   f"argmax + {checked['within_rounding']} rounding + {checked['beyond_rounding']} beyond "
                   f"= {checked['tokens']}; {fig['distinct_completions']} distinct; "
                   f"{fig['engine']['tokens_per_s']:.0f} vs {fig['generate']['tokens_per_s']:.0f} tok/s")
        if "window_changes_completions" in fig:
            summary += (f"; prompts {fig['prompt_tokens_min']}-{fig['prompt_tokens_max']} > window "
                        f"{fig['window']}; opened, {fig['window_changes_completions']}/{n} change")
        bad = [d for d in fig["divergences"] if not d["rounding"]]
        if bad or checked["beyond_rounding"]:
            first = f" (first: prompt {bad[0]['prompt']}, token {bad[0]['position']})" if bad else ""
            why = (f"the engine differs from transformers beyond {fig['dtype']} rounding: {len(bad)}/{n} "
                   f"completions from generate's{first}, {checked['beyond_rounding']} tokens from a forward "
                   f"pass's argmax (largest gap {checked['max_gap_ulps']:.0f} units in the last place)")
            self.record(name, "failed", done[0], fig, why=why, summary=summary)
        elif fig["distinct_completions"] < 2:
            self.record(name, "failed", done[0], fig, summary=summary,
                        why="every prompt gave the same completion: the comparison cannot see a mask error")
        elif fig.get("window_changes_completions") == 0:
            self.record(name, "failed", done[0], fig, summary=summary,
                        why="opening the window changes no completion: the check cannot see a window ignored")
        else:
            self.record(name, "ok", done[0], fig, summary=summary)

    def train_qlora(self, name: str) -> None:
        if package_version("bitsandbytes") is None:
            self.record(name, "skipped", why="bitsandbytes is not installed")
            return
        s = self.sizes
        out = self.work / "runs" / "qlora"
        done = self.run(name, [*GSMKIT, "train", "qlora", "--model", str(self.model_dirs["qwen"]),
                               "--data", str(self.work / "data"), "--pool", str(self.pool),
                               "--max-steps", str(s["qlora_steps"]), "--batch-size", str(s["qlora_batch"]),
                               "--max-length", str(s["max_length"]), "--lora-r", str(s["lora_r"]),
                               "--lora-alpha", str(2 * s["lora_r"]), "--logging-steps", "1",
                               "--out", str(out), "--overwrite", "--json"])
        if done is None or done[1] != 0:
            return
        fig = last_json(done[2]) or {}
        fig.pop("out", None)  # under --work, removed at the end
        fig["device"] = "cuda" if self.cuda else "cpu"
        if not self.cuda:
            fig["note"] = "bitsandbytes' CPU backend: its CUDA 4-bit kernels did not run"
        self.adapters["qlora"] = out
        summary = (f"{fig.get('steps')} steps on {fig['device']}, loss {fmt(fig.get('train_loss'))}, "
                   f"{fig.get('tokens_per_s', 0):.0f} tok/s"
                   + (f", peak CUDA {fig.get('peak_cuda_mb') or 0:.0f} MB" if self.cuda else
                      " (bitsandbytes' CPU backend)"))
        self.record(name, "ok", done[0], fig, summary=summary)

    def train_grpo(self, name: str) -> None:
        if package_version("trl") is None:
            self.record(name, "skipped", why="trl is not installed")
            return
        s = self.sizes
        out = self.work / "runs" / "grpo"
        done = self.run(name, [*GSMKIT, "train", "grpo", "--model", str(self.model_dirs["qwen"]),
                               "--data", str(self.work / "data"), "--pool", str(self.pool),
                               "--max-steps", "1", "--train-samples", "8", "--prompts-per-step", "2",
                               "--num-generations", str(s["grpo_generations"]),
                               "--max-completion-length", str(s["grpo_tokens"]), "--rollouts", "engine",
                               "--lora-r", str(s["lora_r"]), "--lora-alpha", str(2 * s["lora_r"]),
                               "--out", str(out), "--overwrite", "--json"])
        if done is None or done[1] != 0:
            return
        fig = last_json(done[2]) or {}
        fig.pop("out", None)
        log = out / "trainer_log.jsonl"
        steps = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
        step = next((r for r in steps if "reward" in r), {})
        fig.update({k: step[k] for k in ("step_time", "rollout_time", "completions/mean_length")
                    if k in step})
        self.adapters["grpo"] = out
        summary = (f"{fig.get('steps')} step, {fmt(fig.get('step_time'))} s (rollout "
                   f"{fmt(fig.get('rollout_time'))} s), reward {fmt(fig.get('reward_last'))}")
        self.record(name, "ok", done[0], fig, summary=summary)

    def merge(self, name: str) -> None:
        which = next((k for k in ("qlora", "grpo") if k in self.adapters), None)
        if which is None:
            self.record(name, "skipped", why="no adapter to merge: train qlora and train grpo made none")
            return
        out = self.work / "runs" / "merged"
        done = self.run(name, [*GSMKIT, "merge", "--model", str(self.model_dirs["qwen"]),
                               "--adapter", str(self.adapters[which]), "--data", str(self.work / "data"),
                               "--verify-limit", str(self.sizes["verify"]), "--out", str(out),
                               "--overwrite", "--json"])
        if done is None or done[1] != 0:
            return
        report = last_json(done[2]) or {}
        gate = report.get("float32") or {}
        fig = {"adapter": which, "trained_in_4bit": report.get("trained_in_4bit"), "gate": gate,
               "verify": report.get("verify")}
        summary = (f"{which} adapter{' (nf4 base)' if report.get('trained_in_4bit') else ''}: rel ppl diff "
                   f"{fmt(gate.get('rel_ppl_diff'))}, argmax agreement {fmt(gate.get('argmax_agreement'))}")
        if gate.get("passed") is not True:
            self.record(name, "failed", done[0], fig, why="the verification gate did not pass",
                        summary=summary)
        else:
            self.record(name, "ok", done[0], fig, summary="gate passed: " + summary)

    def backend_parity(self, name: str) -> None:
        missing = [] if self.cuda else ["no CUDA device (vLLM runs on CUDA only)"]
        if package_version("vllm") is None:
            missing.append("vllm is not installed")
        if missing:
            self.record(name, "skipped", why="; ".join(missing))
            return
        out = self.work / "runs" / "parity"
        done = self.run(name, [sys.executable, str(ROOT / "benchmarks" / "backend_parity.py"),
                               "--out", str(out), "--model", str(self.model_dirs["qwen"]),
                               "--gsm8k-dir", str(self.work / "data"),
                               "--limit", str(self.sizes["parity_limit"]),
                               "--max-new-tokens", str(self.sizes["parity_tokens"])])
        if done is None or done[1] != 0:
            return
        results = out / "results.json"
        if not results.is_file():
            self.record(name, "failed", done[0], why=f"no {results.name}: {error_line(done[2])}", log=done[2])
            return
        r = json.loads(results.read_text(encoding="utf-8"))
        fig = {"agreement": r["agreement"], "speed_ratio_vllm_over_hf": r["speed_ratio_vllm_over_hf"],
               "problems_per_s": {b: run["problems_per_s"] for b, run in r["runs"].items()}}
        a = r["agreement"]
        summary = (f"identical completions {a['identical_completion']}/{a['n']}, strict answers "
                   f"{a['strict_agree']}/{a['n']}; vllm {r['speed_ratio_vllm_over_hf']:.2f}x hf problems/s")
        self.record(name, "ok", done[0], fig, summary=summary)


GSMKIT = [sys.executable, "-m", "gsmkit"]  # this checkout's CLI (run from the project root), as users run it


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "-" if x is None else str(x)


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def error_line(log: Path) -> str:
    """The line of a failed command's log that says what went wrong: gsmkit's `error:` line, else the
    exception that ended a traceback, else the last line."""
    text = log.read_text(encoding="utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (r"^error:", r"^[A-Za-z_.]*(Error|Exception)\b"):
        found = [ln for ln in lines if re.match(pattern, ln)]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "no output"


def last_json(log: Path) -> dict | None:
    """A command's `--json` summary: the last line of its log that parses as a JSON object."""
    for line in reversed(log.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def git_state() -> dict[str, Any]:
    """The checkout's commit, and whether files differ from it (None where git cannot say)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit.strip() if commit else None,
            "git_modified": None if status is None else bool(status.strip())}


def print_table(result: dict[str, Any]) -> None:
    where = "; ".join(result["notes"]) or f"CUDA device: {result['device'].get('name')}"
    print(f"\ngpu_check ({result['mode']} sizes; {where})")
    print(f"{'step':<22} {'status':<8} {'seconds':>8}  note")
    for name, step in result["steps"].items():
        seconds = "" if step.get("seconds") is None else f"{step['seconds']:.1f}"
        note = step.get("summary") or step.get("error") or ""
        print(f"{name:<22} {step['status']:<8} {seconds:>8}  {note}")
    c = result["summary"]
    print(f"{c['ok']} ok, {c['skipped']} skipped, {c['failed']} failed in {result['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_worker is not None:
        return engine_worker(args.engine_worker)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args, work)
    check.save()
    try:
        if check.setup():
            check.step("engine_bf16", check.engine, "qwen")
            check.step("engine_sliding_window", check.engine, "mistral", opened="mistral_opened")
            check.step("train_qlora", check.train_qlora)
            check.step("train_grpo", check.train_grpo)
            check.step("merge", check.merge)
            check.step("backend_parity", check.backend_parity)
        else:
            for name in STEPS[1:]:
                check.record(name, "skipped", why="setup failed")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(check.result)
    print(f"results: {check.out}")
    return 1 if check.result["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training benchmarks for `gsmkit train sft | qlora` on SmolLM2-135M-Instruct (CPU, float32).

Three parts, each run as separate processes so timings and peak memory do not leak between tools:

speed     `gsmkit train sft` against a plain TRL `SFTTrainer` script with the same model, rows
          (GSM8K train minus the few-shot pool, as chat prompt/completion), LoRA (r=16, alpha=32,
          dropout 0.05, q/k/v/o/gate/up/down), batch, max length, learning rate, steps and gradient
          checkpointing (off in both unless --gc; TRL's own default is on). Reported:
          real (non-padding) training tokens per second, as counted by transformers' Trainer
          (`include_num_input_tokens_seen="non_padding"`) over `trainer.train()`, and peak RSS.
          `--variants`: gsmkit's length-grouped padded batches (its default), gsmkit `--packing`, TRL with
          `padding_free=True` (rows flattened into one sequence, as TRL offers it on a CPU) and TRL's
          padded default; they alternate for `--repeats` rounds, every run is reported and a ratio is the
          worse pairing (gsmkit's slowest run against TRL's fastest; its peak RSS the other way round).
memory    what the peak of `train sft`'s first (longest) batch is made of, from the step as it was (the
          model's own loss over full logits, PEFT's nn.Dropout, glibc's default mmap threshold) to the
          step as `train sft` runs it, one saving at a time: resident memory after loading and after the
          forward pass, the bytes autograd keeps for the backward pass by kind (full-vocabulary logits,
          attention matrices, other activations), peak RSS, seconds of the forward and backward pass.
learning  `--steps` optimizer steps of `train sft` and of `train qlora`; mean response-only loss and
          perplexity on `--eval-rows` GSM8K *test* answers (chat style, the answer and end-of-turn
          tokens scored) before and after, each adapter scored on the base it was trained with.

Run from the project root:
    python benchmarks/train_sft.py speed --out bench-out/train_speed_epoch --steps 16 --rows 128 [--repeats 2]
    python benchmarks/train_sft.py memory --out bench-out/train_memory --rows 128
    python benchmarks/train_sft.py learning --out bench-out/train_learning --steps 200 --batch-size 2 \
        --max-length 384 [--seeds 1 2]
Writes `<out>/results.json` and prints a table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from _common import (
    alternating,
    bench_parser,
    ensure_hf_model,
    gsmkit_command,
    machine_info,
    run_timed,
    tail,
    worse_ratio,
)

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
INIT_MODES = {"qlora-loftq": "loftq", "qlora-cloq": "cloq"}  # benchmark mode -> train qlora --init-lora
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TRL_SCRIPT = r'''
import json, resource, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

model_dir, rows_path, out, steps, batch, max_len, lr, seed, gc = sys.argv[1:10]
qlora = sys.argv[10:11] == ["1"]
padding_free = sys.argv[11:12] == ["1"]
rows = [json.loads(x) for x in open(rows_path)]
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                         "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(model_dir)
if qlora:  # the QLoRA recipe of the PEFT/TRL docs: nf4, double quant, k-bit preparation
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=bnb,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc == "1")
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
# padding-free rows are never cut (TRL refuses a max_length there); the rows are shorter than it anyway
cfg = SFTConfig(output_dir=out, per_device_train_batch_size=int(batch),
                max_length=None if padding_free else int(max_len),
                learning_rate=float(lr), max_steps=int(steps), lr_scheduler_type="cosine", warmup_steps=0.03,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=int(seed),
                include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                gradient_checkpointing=gc == "1", padding_free=padding_free)
peft = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=TARGETS,
                  bias="none", task_type="CAUSAL_LM")
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft)
t0 = time.perf_counter()
result = trainer.train()
seconds = time.perf_counter() - t0
tokens = int(trainer.state.num_input_tokens_seen)
print(json.dumps({"steps": trainer.state.global_step, "train_s": seconds, "tokens": tokens,
                  "tokens_per_s": tokens / seconds, "train_loss": result.training_loss,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
trainer.save_model(out)  # the adapter, after the timed part
'''


def trl_script() -> str:
    return (TRL_SCRIPT.replace("LORA_R", str(LORA["r"])).replace("LORA_ALPHA", str(LORA["alpha"]))
            .replace("LORA_DROPOUT", str(LORA["dropout"])).replace("TARGETS", repr(TARGETS)))


def prepare_rows(gsm8k_dir: Path, pool: Path, out: Path, n: int) -> Path:
    """The first n GSM8K train rows that are not in the few-shot pool, as {question, answer} JSONL."""
    from gsmkit.data.fewshot import pool_hashes, read_pool
    from gsmkit.data.gsm8k import load_gsm8k

    hashes = pool_hashes(read_pool(pool))
    rows = [p for p in load_gsm8k(gsm8k_dir, "train") if p.sha256 not in hashes][:n]
    path = out / "train_rows.jsonl"
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in rows))
    return path


def last_json(log: Path) -> dict:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON summary in {log}:\n{tail(log)}")


def run_speed(args, model_dir: Path, rows: Path, pool: Path) -> dict:
    """The variants alternating (gsmkit, trl, gsmkit-packed, gsmkit, ...), `--repeats` rounds, every run kept;
    the ratios are the worse pairing (gsmkit's slowest run against TRL's fastest)."""
    out = args.out
    common = ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--learning-rate", str(args.lr), "--seed", "42"]
    script = out / "trl_sft.py"
    script.write_text(trl_script())

    def command(name: str, i: int) -> list[str]:
        folder = str(out / f"{name}-{i + 1}")
        if name.startswith("trl"):
            return [sys.executable, str(script), str(model_dir), str(rows), folder, str(args.steps),
                    str(args.batch_size), str(args.max_length), str(args.lr), "42", "1" if args.gc else "0",
                    "0", "1" if name == "trl" else "0"]
        return gsmkit_command() + [
            "train", "sft", "--model", str(model_dir), "--data", str(rows), "--pool", str(pool),
            "--max-steps", str(args.steps), "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
            "--lora-dropout", str(LORA["dropout"]), "--out", folder, "--overwrite", "--json",
            "--gradient-checkpointing" if args.gc else "--no-gradient-checkpointing",
            "--packing" if name == "gsmkit-packed" else "--no-packing", *common]

    def run(name: str, i: int) -> dict:
        # each run is its own process and reports its own peak RSS (ru_maxrss of itself)
        cmd, log = command(name, i), out / "logs" / f"{name}-{i + 1}.log"
        wall, code = run_timed(cmd, log)
        if code != 0:
            raise SystemExit(f"{name} failed ({code}):\n{tail(log)}")
        summary = last_json(log)
        print(f"{name} run {i + 1}: {summary['tokens_per_s']:.1f} tokens/s, "
              f"peak RSS {summary['peak_rss_mb'] / 1024:.1f} GB", file=sys.stderr)
        return {"wall_s": round(wall, 1), "command": cmd, **summary}

    runs = alternating(args.variants, args.repeats, run)
    results: dict = {"runs": runs}
    for name in args.variants:
        if name.startswith("gsmkit") and "trl" in runs:
            theirs = runs["trl"]
            speed = [r["tokens_per_s"] for r in runs[name]]
            results[f"{name}_over_trl_tokens_per_s"] = worse_ratio(speed, [r["tokens_per_s"] for r in theirs],
                                                                   True)
            results[f"{name}_over_trl_peak_rss"] = (max(r["peak_rss_mb"] for r in runs[name])
                                                    / min(r["peak_rss_mb"] for r in theirs))
    return results


# memory: each saving of `train sft` added in turn, from the step as it was (the model's own loss over full
# logits, PEFT's nn.Dropout, glibc's default mmap threshold) to the step as `train sft` runs it
MEMORY_STEPS = (("before", ["--loss-chunk", "0", "--plain-dropout", "--default-malloc"]),
                ("+ chunked loss", ["--plain-dropout", "--default-malloc"]),
                ("+ lean LoRA dropout", ["--default-malloc"]),
                ("+ 4 MB mmap threshold (train sft)", []))


def run_memory(args, *_paths: Path) -> dict:
    """What the peak of one training step is made of: each configuration of `MEMORY_STEPS` in a fresh
    process (`memory-step`), on the batch that sets `train sft`'s peak."""
    results = {}
    for i, (name, flags) in enumerate(MEMORY_STEPS):
        log = args.out / "logs" / f"memory_{i}.log"
        cmd = [sys.executable, __file__, "memory-step", "--out", str(args.out), "--batch-size",
               str(args.batch_size), "--max-length", str(args.max_length), "--rows", str(args.rows), *flags]
        code = run_timed(cmd, log)[1]
        if code != 0:
            raise SystemExit(f"memory step ({name}) failed ({code}):\n{tail(log)}")
        results[name] = {"command": cmd, **last_json(log)}
    return results


def memory_step(args, model_dir: Path, rows: Path, pool: Path) -> dict:
    """One forward and backward of the batch `train sft` starts with (length grouping puts the longest rows
    first: the run's peak), through gsmkit's own model loading, LoRA, loss and allocator setting (each of
    the last three can be turned back to the plain one). Measured: resident memory after loading and after
    the forward pass, the bytes autograd keeps for the backward pass by kind (full-vocabulary logits,
    attention matrices, other activations), and the process's peak."""
    import resource

    import torch

    from gsmkit.modeling import load_model, load_tokenizer
    from gsmkit.training.collate import PadCollator
    from gsmkit.training.config import TrainSettings
    from gsmkit.training.lora import add_lora, prepare_base
    from gsmkit.training.loss import response_loss
    from gsmkit.training.memory import return_freed_memory
    from gsmkit.training.sft import prepare_examples

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    settings = TrainSettings(model=str(model_dir), out=args.out / "unused", data=str(rows), pool=pool,
                             max_length=args.max_length, batch_size=args.batch_size, lora_r=LORA["r"],
                             lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             loss_chunk=args.loss_chunk, gradient_checkpointing=False)
    tokenizer = load_tokenizer(settings.model)
    encoded = prepare_examples(settings, tokenizer)[0]
    loaded = load_model(settings.model_spec(), for_training=True)
    mmap_threshold = None if args.default_malloc else return_freed_memory(loaded.device)
    model, _ = add_lora(prepare_base(loaded.model, False, False), settings)
    if args.plain_dropout:  # PEFT's own nn.Dropout back in place of train sft's lean one
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict):
                for name in list(dropouts):
                    dropouts[name] = torch.nn.Dropout(dropouts[name].p)
    model.train()
    after_load = rss_mb()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    longest = sorted(encoded, key=lambda e: len(e.input_ids), reverse=True)[: args.batch_size]
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels}
                                                  for e in longest])
    n = batch["labels"][:, 1:].ne(-100).sum()
    vocab, width = model.config.vocab_size, batch["input_ids"].shape[1]
    kept: dict[int, tuple[str, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kind = ("logits" if t.dim() and t.shape[-1] == vocab else
                    "attention" if t.dim() >= 2 and tuple(t.shape[-2:]) == (width, width) else "activations")
            kept[storage.data_ptr()] = (kind, storage.nbytes())
        return t

    loss_fn = response_loss(model, args.loss_chunk)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    profiler = torch.profiler.profile(activities=cpu) if args.profile else None
    if profiler is not None:
        profiler.start()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if loss_fn is None:
            loss = model(**batch, num_items_in_batch=n).loss
        else:
            loss = loss_fn(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                           batch["labels"], num_items_in_batch=n)
    after_forward = rss_mb()
    loss.backward()
    seconds = time.perf_counter() - t0
    if profiler is not None:
        profiler.stop()
    by_kind = {k: round(sum(b for kind, b in kept.values() if kind == k) / 2**20, 1)
               for k in ("logits", "attention", "activations")}
    summary = {"malloc_mmap_threshold": mmap_threshold, "batch": list(batch["input_ids"].shape),
               "real_tokens": int(batch["attention_mask"].sum()),
               "scored_tokens": int(n), "loss": float(loss), "rss_after_load_mb": round(after_load, 1),
               "rss_after_forward_mb": round(after_forward, 1),
               "kept_for_backward_mb": by_kind, "kept_for_backward_total_mb": round(sum(by_kind.values()), 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "forward_backward_s": round(seconds, 2)}
    if profiler is not None:
        summary["profile"] = time_by_kind(profiler)
    print(json.dumps(summary))
    return summary


# what each profiled operator is, for `memory-step --profile` (the first pattern in its name that matches)
OP_KINDS = (("attention", ("attention", "sdpa", "flash")),
            ("matrix products", ("mm", "matmul", "linear", "addmm", "bmm")),
            ("elementwise and the rest", ("",)))


def time_by_kind(profiler) -> dict:
    """Self CPU seconds of a profiled forward + backward by kind of operator (matrix products, attention, the
    rest), and the ten costliest operators."""
    averages = [a for a in profiler.key_averages() if a.self_cpu_time_total > 0]
    total = sum(a.self_cpu_time_total for a in averages)
    kinds: dict[str, float] = {}
    for a in averages:
        name = a.key.lower()
        kind = next(k for k, words in OP_KINDS if any(w in name for w in words))
        kinds[kind] = kinds.get(kind, 0.0) + a.self_cpu_time_total
    top = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)[:10]
    return {"self_cpu_s": round(total / 1e6, 2),
            "share_by_kind": {k: round(v / total, 3)
                              for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": a.key, "self_cpu_s": round(a.self_cpu_time_total / 1e6, 2), "calls": a.count}
                        for a in top]}


def run_learning(args, model_dir: Path, rows: Path, pool: Path) -> dict:
    import torch

    from gsmkit.evaluation.perplexity import perplexity, response_nll
    from gsmkit.modeling import ModelSpec, load_model
    from gsmkit.training.data import load_train_examples
    from gsmkit.training.masking import encode_example

    test = load_train_examples(args.gsm8k_dir, "test")[: args.eval_rows]
    out = args.out
    results: dict = {}

    def score(mode: str, adapter: Path | None, init_seed: int | None = None) -> dict:
        loaded = load_model(ModelSpec(str(model_dir), adapter=str(adapter) if adapter else None,
                                      load_in_4bit="qlora" in mode))
        model = loaded.model
        if init_seed is not None:  # the adapter as `train qlora --init-lora X` starts it, before any step
            model = initialised_adapter(model, loaded.tokenizer, INIT_MODES[mode], init_seed)
        enc = [encode_example(ex, loaded.tokenizer, "chat", 1024) for ex in test]
        t0 = time.perf_counter()
        nll, n, _ = response_nll(model, enc, batch_size=8, pad_id=loaded.tokenizer.pad_token_id)
        del loaded, model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return {"loss": nll / n, "ppl": perplexity(nll, n), "tokens": n,
                "seconds": round(time.perf_counter() - t0, 1)}

    def initialised_adapter(model, tokenizer, method: str, seed: int):
        from peft import LoraConfig, get_peft_model

        from gsmkit.training.config import TrainSettings
        from gsmkit.training.lora import initialise_lora
        from gsmkit.training.sft import prepare_examples

        settings = TrainSettings(model=str(model_dir), out=out / "unused", mode="qlora", data=str(rows),
                                 pool=pool, max_length=args.max_length, seed=seed, init_lora=method)
        encoded = prepare_examples(settings, tokenizer)[0]  # the rows train() encodes: the same calibration
        peft_model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                      target_modules=TARGETS, task_type="CAUSAL_LM"))
        initialise_lora(peft_model, settings, encoded, tokenizer.pad_token_id)  # the call train() makes
        return peft_model.eval()

    partial = out / "results.partial.json"
    done = json.loads(partial.read_text()) if partial.exists() else {}  # resume: finished (mode, seed) runs
    seeds = args.seeds
    for seed in seeds:
        for mode in args.modes:
            key = mode if len(seeds) == 1 else f"{mode}/seed{seed}"
            if key in done:
                results[key] = done[key]
                continue
            before_key = f"{'qlora' if 'qlora' in mode else 'sft'}/before"  # the same base for every variant
            before = done.get(before_key) or score(mode, None)  # the base model's score, once per mode
            done[before_key] = results[before_key] = before
            run_dir = out / (mode if len(seeds) == 1 else f"{mode}-seed{seed}")
            if mode.startswith("trl-"):  # the plain TRL SFTTrainer script of the speed part, as a reference
                script = out / "trl_sft.py"
                script.write_text(trl_script())
                cmd = [sys.executable, str(script), str(model_dir), str(rows), str(run_dir), str(args.steps),
                       str(args.batch_size), str(args.max_length), str(args.lr), str(seed),
                       "1" if mode == "trl-qlora" else "0", "1" if mode == "trl-qlora" else "0"]
            else:
                cmd = gsmkit_command() + [
                    "train", mode.split("-")[0], "--model", str(model_dir), "--data", str(rows),
                    "--pool", str(pool),
                    "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
                    str(args.max_length), "--learning-rate", str(args.lr), "--lora-r", str(LORA["r"]),
                    "--lora-alpha", str(LORA["alpha"]), "--seed", str(seed), "--out", str(run_dir),
                    "--overwrite", "--json",
                    *(["--init-lora", INIT_MODES[mode]] if mode in INIT_MODES else [])]
            log = out / "logs" / f"train_{mode}_seed{seed}.log"
            wall, code = run_timed(cmd, log)
            if code != 0:
                raise SystemExit(f"train {mode} (seed {seed}) failed ({code}):\n{tail(log)}")
            summary = last_json(log)
            after = score(mode, run_dir)
            init = score(mode, None, init_seed=seed) if mode in INIT_MODES else None
            done[key] = results[key] = {"seed": seed, "before": before, "init": init, "after": after,
                                        "train": summary, "wall_s": round(wall, 1),
                                        "ppl_reduction": 1 - after["ppl"] / before["ppl"], "command": cmd}
            partial.write_text(json.dumps(done, indent=2))
    for prefix, q in (("", "qlora"), ("trl-", "qlora"), *(("", m) for m in INIT_MODES)):
        # qlora's perplexity after training relative to sft's, per seed and on average
        gaps = {}
        for seed in seeds:
            sft, qlora = (results.get(prefix + m if len(seeds) == 1 else f"{prefix}{m}/seed{seed}")
                          for m in ("sft", q))
            if sft and qlora:
                gaps[str(seed)] = qlora["after"]["ppl"] / sft["after"]["ppl"] - 1
        name = f"{prefix.replace('-', '_')}{q.replace('-', '_')}_vs_sft_after_ppl"
        if len(gaps) == 1:
            results[name] = next(iter(gaps.values()))
        elif gaps:
            results[f"{name}_per_seed"] = gaps
            results[f"{name}_mean"] = sum(gaps.values()) / len(gaps)
    return results


def plot_learning(results: dict, png: Path, window: int = 4) -> None:
    """Training loss per step of every trained mode in one figure (a running mean over `window` logs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, run in results.items():
        trained = isinstance(run, dict) and "train" in run
        log = Path(run["train"]["out"]) / "trainer_log.jsonl" if trained else None
        if log is None or not log.exists():
            continue
        points = [(r["step"], r["loss"]) for r in map(json.loads, log.read_text().splitlines())
                  if "loss" in r]
        steps = [p[0] for p in points]
        windows = [points[max(0, i - window + 1):i + 1] for i in range(len(points))]
        mean = [sum(v for _, v in w) / len(w) for w in windows]
        init = f" (init {run['init']['ppl']:.2f})" if run.get("init") else ""
        ax.plot(steps, mean,
                label=f"{key}: held-out ppl {run['before']['ppl']:.2f}{init} -> {run['after']['ppl']:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (response tokens, mean of {window} logs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("part", choices=["speed", "memory", "learning", "memory-step"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rows", type=int, default=2048, help="training rows (GSM8K train minus the pool)")
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--loss-chunk", type=int, default=1024, help="memory-step: train sft's --loss-chunk")
    parser.add_argument("--plain-dropout", action="store_true", help="memory-step: PEFT's nn.Dropout")
    parser.add_argument("--profile", action="store_true",
                        help="memory-step: profile the forward and backward pass (self CPU time by operator)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="memory-step: glibc's own mmap threshold")
    parser.add_argument("--repeats", type=int, default=2, help="speed: rounds of the variants, alternating")
    parser.add_argument("--variants", nargs="+", default=["gsmkit", "trl", "gsmkit-packed"],
                        choices=["gsmkit", "gsmkit-packed", "trl", "trl-padded"],
                        help="speed: gsmkit (length-grouped padded batches, the default), gsmkit-packed "
                             "(--packing), trl (SFTTrainer with padding_free=True, which TRL offers on a CPU "
                             "through transformers' packed-sequence masks), trl-padded (its default)")
    parser.add_argument("--gc", action="store_true",
                        help="gradient checkpointing in both tools (TRL's default)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42],
                        help="training seeds (data order, LoRA init, dropout); with several, each mode is "
                             "trained once per seed and the qlora/sft perplexity gap is reported per seed "
                             "and on average")
    parser.add_argument("--modes", nargs="+", default=["sft", "qlora"],
                        choices=["sft", "qlora", *INIT_MODES, "trl-sft", "trl-qlora"],
                        help="qlora-loftq / qlora-cloq: train qlora --init-lora loftq / cloq (also scored at "
                             "initialisation, before any step); trl-sft / trl-qlora: the plain TRL "
                             "SFTTrainer script (QLoRA as in the PEFT/TRL "
                             "docs) trained and scored the same way, as a reference for the gap")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out.parent / "smollm2-hf"
    ensure_hf_model(model_dir)
    pool = args.out / "pool.jsonl"
    code = run_timed(gsmkit_command() + ["fewshot", "--data", str(args.gsm8k_dir), "--out", str(pool)],
                     args.out / "logs" / "fewshot.log")[1]
    if code != 0:
        raise SystemExit("gsmkit fewshot failed")
    rows = prepare_rows(args.gsm8k_dir, pool, args.out, args.rows)
    run_part = {"speed": run_speed, "memory": run_memory, "learning": run_learning,
                "memory-step": memory_step}
    results = run_part[args.part](args, model_dir, rows, pool)
    if args.part == "memory-step":
        return
    record = {"benchmark": f"train_{args.part}", "settings": {k: str(v) for k, v in vars(args).items()},
              "machine": machine_info(), "results": results}
    (args.out / "results.json").write_text(json.dumps(record, indent=2, default=str))
    if args.part == "learning":
        plot_learning(results, args.out / "loss_curves.png")
    from rich.console import Console

    Console().print_json(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)} |
                                    {k: {kk: vv for kk, vv in v.items() if kk != "command"}
                                     for k, v in results.items() if isinstance(v, dict)}, default=str))


if __name__ == "__main__":
    main()

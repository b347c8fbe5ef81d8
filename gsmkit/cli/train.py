"""`gsmkit train sft | qlora | grpo`: response-only fine-tuning with LoRA, 4-bit QLoRA or full weights, and GRPO."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gsmkit.cli.options import JsonOpt, ModelOpt, usage_errors

app = typer.Typer(help="Fine-tune a model on GSM8K (or traces, or any prompt/response JSONL), or train it with GRPO.", no_args_is_help=True)

# Options default to None so that a preset or --config value is overridden only by flags actually given.
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder for the adapter, logs and manifest.",
                                      file_okay=False)]
DataOpt = Annotated[str | None, typer.Option("--data", help="Training data: GSM8K Hub id or local file/folder, or a JSONL of {question, answer}, {prompt, response} or {messages}. [default: openai/gsm8k]")]
TracesOpt = Annotated[str | None, typer.Option("--traces", help="A traces JSONL from `gsmkit generate-traces`, used instead of --data.")]
SplitOpt = Annotated[str | None, typer.Option("--split", help="Split of a GSM8K source. [default: train]")]
PoolOpt = Annotated[Path | None, typer.Option("--fewshot-pool", help="Few-shot pool to keep out of training. [default: ./fewshot_pool.jsonl, else the default pool drawn from GSM8K train]", exists=True, dir_okay=False)]
KOpt = Annotated[int | None, typer.Option("--k", help="Exemplars the run's evaluation uses (recorded in the manifest). [default: 5]", min=0)]
StyleOpt = Annotated[str | None, typer.Option("--style", help="Prompt style shared with eval: auto | chat | plain | tags. [default: auto]")]
SystemOpt = Annotated[str | None, typer.Option("--system-prompt", help="System prompt (chat) or preamble (plain).")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="simple (1 epoch, k=3, eval 512 tokens) | medium (1 epoch, k=5, checkpoint sweep) | strong (2 epochs, k=8, uses --traces).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file with the same keys as the long options (flags win).", exists=True, dir_okay=False)]
LoraROpt = Annotated[int | None, typer.Option("--lora-r", help="LoRA rank. [default: 16]", min=1)]
LoraAlphaOpt = Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha. [default: 32]", min=1)]
LoraDropoutOpt = Annotated[float | None, typer.Option("--lora-dropout", help="LoRA dropout. [default: 0.05]")]
TargetsOpt = Annotated[list[str] | None, typer.Option("--target-modules", help="LoRA target module names (repeatable). [default: q/k/v/o/gate/up/down_proj present in the model]")]
LrOpt = Annotated[float | None, typer.Option("--learning-rate", "--lr", help="Peak learning rate. [default: 2e-4]")]
SchedOpt = Annotated[str | None, typer.Option("--lr-scheduler", help="linear | cosine | constant ... [default: cosine]")]
WarmupOpt = Annotated[float | None, typer.Option("--warmup-ratio", help="Share of steps for warmup. [default: 0.03]")]
EpochsOpt = Annotated[float | None, typer.Option("--epochs", help="Training epochs. [default: 1]")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps (overrides --epochs).")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Rows per device per step. [default: 8]", min=1)]
AccumOpt = Annotated[int | None, typer.Option("--grad-accum", help="Gradient accumulation steps. [default: 1]", min=1)]
MaxLenOpt = Annotated[int | None, typer.Option("--max-length", help="Max tokens per example; the prompt is cut first. [default: 512]")]
MaxSamplesOpt = Annotated[int | None, typer.Option("--max-samples", help="Use only the first N training rows.", min=1)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed. [default: 42]")]
InitLoraOpt = Annotated[str | None, typer.Option(
    "--init-lora", help="default (B = 0) | loftq: start the adapter at the rank-r SVD of the nf4 quantization error "
    "(LoftQ) | cloq: at the rank-r correction of that error that minimises each layer's output error on "
    "--calibration-rows training rows (CLoQ), so training starts close to the full-precision model. "
    "[default: default]")]
CalibRowsOpt = Annotated[int | None, typer.Option(
    "--calibration-rows", help="--init-lora cloq: training rows (a sample drawn with --seed) whose layer inputs "
    "weight the quantization error. [default: 128]", min=1)]
GcOpt = Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory. [default: on for qlora]")]
SaveStepsOpt = Annotated[int | None, typer.Option("--save-steps", help="Keep an adapter checkpoint every N steps (enables --resume).", min=1)]
SaveLimitOpt = Annotated[int | None, typer.Option("--save-total-limit", help="Keep at most this many checkpoints.", min=1)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a finished or interrupted run in --out.")]
EvalLimitOpt = Annotated[int | None, typer.Option("--eval-limit", help="After training, run `eval gsm8k` on N test problems with the run's k and style.", min=1)]
EvalDataOpt = Annotated[str | None, typer.Option("--eval-data", help="GSM8K source for --eval-limit (test split). [default: --data]")]
EvalTokensOpt = Annotated[int | None, typer.Option("--eval-max-new-tokens", help="Generation budget of that evaluation. [default: 256]")]
SweepOpt = Annotated[int | None, typer.Option("--sweep-last", help="Also evaluate the last M checkpoints and record the best.", min=1)]
ShowMaskingOpt = Annotated[int, typer.Option("--show-masking", help="Print N encoded examples with trained tokens highlighted, then exit.", min=0)]
DTypeOpt = Annotated[str | None, typer.Option("--dtype", help="Weights dtype: auto | float32 | bfloat16 | float16. [default: auto]")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps. [default: auto]")]
LoggingOpt = Annotated[int | None, typer.Option("--logging-steps", help="Log (and draw the loss curve) every N steps. [default: 5]", min=1)]
FullOpt = Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA (writes a full model).")]


INIT_UNITS = {"calibrating": "batches", "initialising": "layers"}  # training.lora_init's progress stages


def _run(mode: str, flags: dict, config: Path | None, preset: str | None, show_masking: int, json_out: bool) -> None:
    from gsmkit.progress import ProgressTask, stderr_console
    from gsmkit.training.sft import resolve_settings

    with usage_errors():
        settings = resolve_settings({**flags, "mode": mode}, config, preset)
    console = stderr_console()
    if show_masking:
        _show_masking(settings, show_masking, console)
        return
    from gsmkit.training.sft import train

    last: dict = {}
    init_bars: dict[str, ProgressTask] = {}  # --init-lora's stages, one bar each, closed before the next starts

    def on_init(stage: str, done: int, total: int) -> None:
        if stage not in init_bars:
            for other in init_bars.values():
                other.close()
            init_bars[stage] = ProgressTask(f"init-lora {settings.init_lora}: {stage}", INIT_UNITS[stage], console)
        init_bars[stage].update(done, total)

    with ProgressTask(f"train {mode}", "steps", console) as bar:

        def on_start(total: int) -> None:
            for other in init_bars.values():
                other.close()
            bar.start(total)

        def on_step(step: int, total: int) -> None:
            bar.update(step, total, f"train {mode} loss {last.get('loss', float('nan')):.3f}")

        try:
            result = train(settings, on_start=on_start, on_step=on_step, on_log=last.update, on_init=on_init)
        finally:
            for other in init_bars.values():
                other.close()
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    console.print(
        f"trained {result.steps} steps on {result.train_rows} rows ({result.removed_fewshot} few-shot rows removed), "
        f"loss {result.train_loss if result.train_loss is not None else float('nan'):.4f}, "
        f"{result.tokens_per_s:.1f} tokens/s; adapter in {result.out}"
    )
    if result.eval:
        console.print(f"eval: strict {result.eval['accuracy_strict']:.1%}, flexible {result.eval['accuracy_flexible']:.1%} "
                      f"on {result.eval['n']} problems")


def _show_masking(settings, n: int, console) -> None:
    from gsmkit.modeling import load_tokenizer
    from gsmkit.training.masking import masking_preview
    from gsmkit.training.sft import prepare_examples

    tok = load_tokenizer(settings.model)
    encoded, removed, origin, style = prepare_examples(settings, tok)
    console.print(f"style {style}; {len(encoded)} rows after removing {len(removed)} few-shot rows ({origin}); "
                  "trained tokens highlighted", highlight=False)
    for e in encoded[:n]:
        console.rule(f"{e.where}  ({e.num_trainable} trained of {len(e.input_ids)} tokens{', truncated' if e.truncated else ''})")
        console.print(masking_preview(e, tok))


def _flags(params: dict) -> dict:
    """The command's parameters as TrainSettings overrides: None (and an unset switch) means "not given"."""
    kw = {k: v for k, v in params.items() if k not in ("config", "preset", "show_masking", "json_out")}
    kw["target_modules"] = tuple(kw["target_modules"]) if kw.get("target_modules") else None
    for switch in ("full", "resume", "overwrite"):
        kw[switch] = kw.get(switch) or None
    return kw


@app.command("sft")
def sft(
    model: ModelOpt, out: OutOpt = Path("runs/sft"), data: DataOpt = None, traces: TracesOpt = None,
    split: SplitOpt = None, fewshot_pool: PoolOpt = None, k: KOpt = None, style: StyleOpt = None,
    system_prompt: SystemOpt = None, preset: PresetOpt = None, config: ConfigOpt = None, full: FullOpt = False,
    lora_r: LoraROpt = None, lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropoutOpt = None,
    target_modules: TargetsOpt = None, learning_rate: LrOpt = None, lr_scheduler: SchedOpt = None,
    warmup_ratio: WarmupOpt = None, epochs: EpochsOpt = None, max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None, grad_accum: AccumOpt = None, max_length: MaxLenOpt = None,
    max_samples: MaxSamplesOpt = None, seed: SeedOpt = None, dtype: DTypeOpt = None, device: DeviceOpt = None,
    logging_steps: LoggingOpt = None,
    gradient_checkpointing: GcOpt = None, save_steps: SaveStepsOpt = None, save_total_limit: SaveLimitOpt = None,
    resume: ResumeOpt = False, overwrite: OverwriteOpt = False, eval_limit: EvalLimitOpt = None,
    eval_data: EvalDataOpt = None, eval_max_new_tokens: EvalTokensOpt = None, sweep_last: SweepOpt = None,
    show_masking: ShowMaskingOpt = 0, json_out: JsonOpt = False,
) -> None:
    """LoRA (or --full) fine-tuning on a full-precision base, loss on the response tokens only.

    The few-shot pool is removed from the training rows by content hash. Writes the adapter,
    tokenizer, manifest.json, trainer_log.jsonl and loss_curve.png to --out.

    Example: gsmkit train sft --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --max-steps 200 --out runs/sft
    """
    flags = _flags(locals())
    _run("sft", flags, config, preset, show_masking, json_out)


@app.command("qlora")
def qlora(
    model: ModelOpt, out: OutOpt = Path("runs/qlora"), data: DataOpt = None, traces: TracesOpt = None,
    split: SplitOpt = None, fewshot_pool: PoolOpt = None, k: KOpt = None, style: StyleOpt = None,
    system_prompt: SystemOpt = None, preset: PresetOpt = None, config: ConfigOpt = None,
    lora_r: LoraROpt = None, lora_alpha: LoraAlphaOpt = None, lora_dropout: LoraDropoutOpt = None,
    init_lora: InitLoraOpt = None, calibration_rows: CalibRowsOpt = None,
    target_modules: TargetsOpt = None, learning_rate: LrOpt = None, lr_scheduler: SchedOpt = None,
    warmup_ratio: WarmupOpt = None, epochs: EpochsOpt = None, max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None, grad_accum: AccumOpt = None, max_length: MaxLenOpt = None,
    max_samples: MaxSamplesOpt = None, seed: SeedOpt = None, dtype: DTypeOpt = None, device: DeviceOpt = None,
    logging_steps: LoggingOpt = None,
    gradient_checkpointing: GcOpt = None, save_steps: SaveStepsOpt = None, save_total_limit: SaveLimitOpt = None,
    resume: ResumeOpt = False, overwrite: OverwriteOpt = False, eval_limit: EvalLimitOpt = None,
    eval_data: EvalDataOpt = None, eval_max_new_tokens: EvalTokensOpt = None, sweep_last: SweepOpt = None,
    show_masking: ShowMaskingOpt = 0, json_out: JsonOpt = False,
) -> None:
    """4-bit QLoRA: nf4 base with double quantization, LoRA adapters trained in higher precision.

    Same data handling and outputs as `train sft`; gradient checkpointing is on by default.

    Example: gsmkit train qlora --model Qwen/Qwen2.5-1.5B-Instruct --data ../shared/data/gsm8k --k 5
    --max-steps 200 --out runs/qlora
    """
    flags = _flags(locals())
    _run("qlora", flags, config, preset, show_masking, json_out)


@app.command("grpo")
def grpo(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the adapter, logs, reward curve and manifest.",
                                      file_okay=False)] = Path("runs/grpo"),
    init_adapter: Annotated[Path | None, typer.Option("--init-adapter", help="Continue training this SFT adapter "
                                                      "(the 'prep SFT, then GRPO' recipe) instead of a fresh LoRA.",
                                                      exists=True, file_okay=False)] = None,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="QLoRA: nf4 base with double quantization.")] = False,
    data: Annotated[str, typer.Option("--data", help="GSM8K Hub id or local file/folder, or a JSONL of {question, answer} "
                                      "rows (traces too).")] = "openai/gsm8k",
    split: Annotated[str, typer.Option("--split", help="Split of a GSM8K source.")] = "train",
    train_samples: Annotated[int | None, typer.Option("--train-samples", help="Sample budget: train on N problems "
                                                      "drawn with --seed (default: all).", min=1, show_default=False)] = None,
    fewshot_pool: PoolOpt = None,
    k: Annotated[int, typer.Option("--k", help="Few-shot exemplars in each prompt, from the pool.", min=0)] = 0,
    style: Annotated[str, typer.Option("--style", help="Prompt style shared with eval: auto | chat | plain | tags.")] = "auto",
    system_prompt: SystemOpt = None,
    reward_weights: Annotated[str | None, typer.Option(
        "--reward-weights", help="name=weight pairs, comma-separated; names: correctness, strict_format, soft_format, "
        "integer; 0 drops one. [default: correctness=2,strict_format=0.5,soft_format=0.5,integer=0.5]",
        show_default=False)] = None,
    num_generations: Annotated[int, typer.Option("--num-generations", help="Completions sampled per prompt (the group).", min=2)] = 4,
    prompts_per_step: Annotated[int, typer.Option("--prompts-per-step", help="Prompts per device per optimizer step "
                                                  "(times --num-generations completions).", min=1)] = 2,
    max_completion_length: Annotated[int, typer.Option("--max-completion-length", help="Tokens per completion.", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature of the rollouts.")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass of the rollouts.")] = 1.0,
    beta: Annotated[float, typer.Option("--beta", help="KL coefficient (0: no reference model).", min=0.0)] = 0.0,
    learning_rate: Annotated[float, typer.Option("--learning-rate", "--lr", help="Learning rate.")] = 2e-5,
    lr_scheduler: Annotated[str, typer.Option("--lr-scheduler", help="constant | linear | cosine ...")] = "constant",
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Share of steps for warmup.")] = 0.0,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.", min=1)] = 100,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.", min=1)] = 1,
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank (fresh adapters).", min=1)] = 16,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha.", min=1)] = 32,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout.")] = 0.0,
    target_modules: TargetsOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (rollouts, data order, --train-samples).")] = 42,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights dtype: auto | float32 | bfloat16 | float16.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")] = "auto",
    gradient_checkpointing: GcOpt = None,
    logging_steps: Annotated[int, typer.Option("--logging-steps", help="Log rewards every N steps.", min=1)] = 1,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Keep an adapter checkpoint every N steps "
                                            "(enables --resume).", min=0)] = 0,
    time_limit: Annotated[float | None, typer.Option("--time-limit", help="Stop after the step that uses up this many "
                                                     "minutes of training, and save (at most --max-steps).",
                                                     show_default=False)] = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    use_vllm: Annotated[bool, typer.Option("--use-vllm", help="Generate rollouts with TRL's colocated vLLM "
                                           "(needs vllm and a GPU).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """GRPO with LoRA on TRL's GRPOTrainer, rewarded for correct answers (answers.py) and format.

    Prompts are rendered as `eval gsm8k` renders them; the few-shot pool is removed from the problems.
    Writes the adapter, tokenizer, manifest.json, trainer_log.jsonl (rewards per step) and
    reward_curve.png to --out; the adapter loads in `eval gsm8k --adapter`.

    Example: gsmkit train grpo --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --style tags --train-samples 200 --max-steps 50 --out runs/grpo
    """
    from gsmkit.progress import ProgressTask, stderr_console
    from gsmkit.training.grpo import GrpoSettings, train_grpo
    from gsmkit.training.rewards import parse_weights

    with usage_errors():
        weights = parse_weights(reward_weights)
        settings = GrpoSettings(
            model=model, out=out, init_adapter=str(init_adapter) if init_adapter else None, load_in_4bit=load_in_4bit,
            data=data, split=split, train_samples=train_samples, fewshot_pool=fewshot_pool, k=k, style=style,
            system_prompt=system_prompt, reward_weights=tuple(weights.items()), num_generations=num_generations,
            prompts_per_step=prompts_per_step, max_completion_length=max_completion_length, temperature=temperature,
            top_p=top_p, beta=beta, learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
            max_steps=max_steps, grad_accum=grad_accum, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=tuple(target_modules) if target_modules else None, seed=seed, dtype=dtype, device=device,
            gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps, save_steps=save_steps,
            time_limit_s=time_limit * 60 if time_limit is not None else None, resume=resume, overwrite=overwrite, use_vllm=use_vllm,
        )
    console = stderr_console()
    last: dict = {}
    with ProgressTask("train grpo", "steps", console) as bar:

        def on_step(step: int, total: int) -> None:
            bar.update(step, total, f"train grpo reward {last.get('reward', float('nan')):.3f}")

        result = train_grpo(settings, on_start=bar.start, on_step=on_step, on_log=last.update)
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    first = f"{result.reward_first:.3f}" if result.reward_first is not None else "-"
    final = f"{result.reward_last:.3f}" if result.reward_last is not None else "-"
    console.print(f"trained {result.steps} GRPO steps on {result.train_problems} problems "
                  f"({result.removed_fewshot} few-shot rows removed) in {result.train_s:.0f}s; reward {first} -> {final}; "
                  f"adapter and reward_curve.png in {result.out}", highlight=False)

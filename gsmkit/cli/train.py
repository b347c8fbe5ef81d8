"""`gsmkit train sft | qlora | grpo`: response-only fine-tuning (LoRA, 4-bit QLoRA, full weights) and GRPO.

The options are the fields of `TrainSettings` (`QloraSettings`) and `GrpoSettings` (`command_from`): each
default, bound and help is declared once, on the field. Every command gets only the flags actually given, so
that a `--preset` or `--config` value is overridden by a flag alone (`training.config.resolve_settings`).
Under `accelerate launch` or `torchrun` every process trains; only the main one draws the bars and prints the
summary (or the --json line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gsmkit.cli.options import JsonOpt, command_from, usage_errors
from gsmkit.training.config import QloraSettings, TrainSettings, preset_help
from gsmkit.training.grpo_settings import GRPO_PRESET_NOTES, GrpoSettings

app = typer.Typer(help="Fine-tune a model on GSM8K (or traces, or any prompt/response JSONL), or train it "
                  "with GRPO.", no_args_is_help=True)

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="YAML file with the same keys as the long options (flags win).", exists=True,
    dir_okay=False, show_default=False)]
ShowMaskingOpt = Annotated[int, typer.Option(
    "--show-masking", help="Print N encoded examples with trained tokens highlighted, then exit.", min=0)]


def _preset_opt(cls: type, notes: dict[str, str] | None = None) -> object:
    """--preset of a command whose settings are `cls`, its help made from the presets themselves."""
    return Annotated[str | None, typer.Option("--preset", help=preset_help(cls, notes), show_default=False)]


SftPresetOpt = _preset_opt(TrainSettings)
GrpoPresetOpt = _preset_opt(GrpoSettings, GRPO_PRESET_NOTES)

INIT_UNITS = {"calibrating": "batches", "initialising": "layers"}  # training.lora_init's progress stages


@app.command("sft")
@command_from(TrainSettings, exclude=("init_lora", "calibration_rows"), as_flags=True, fixed={"mode": "sft"})
def sft(flags: dict, preset: SftPresetOpt = None, config: ConfigOpt = None,  # type: ignore[valid-type]
        show_masking: ShowMaskingOpt = 0, json_out: JsonOpt = False) -> None:
    """LoRA (or --full) fine-tuning on a full-precision base, loss on the response tokens only.

    The few-shot pool is removed from the training rows by content hash. Writes the adapter,
    tokenizer, manifest.json, trainer_log.jsonl and loss_curve.png to --out. --init-adapter continues a
    trained adapter (the protocol's full SFT from its prep SFT).

    Example: gsmkit train sft --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --max-steps 200 --out runs/sft
    """
    _run(TrainSettings, flags, config, preset, show_masking, json_out)


@app.command("qlora")
@command_from(QloraSettings, exclude=("full",), as_flags=True, fixed={"mode": "qlora"})
def qlora(flags: dict, preset: SftPresetOpt = None, config: ConfigOpt = None,  # type: ignore[valid-type]
          show_masking: ShowMaskingOpt = 0, json_out: JsonOpt = False) -> None:
    """4-bit QLoRA: nf4 base with double quantization, LoRA adapters trained in higher precision.

    Same data handling and outputs as `train sft`; gradient checkpointing is on by default.

    Example: gsmkit train qlora --model Qwen/Qwen2.5-1.5B-Instruct --data ../shared/data/gsm8k --k 5
    --max-steps 200 --out runs/qlora
    """
    _run(QloraSettings, flags, config, preset, show_masking, json_out)


def resolve(cls: type, flags: dict, config: Path | None, preset: str | None):
    """The command's settings from the flags given, --config and --preset: a fault of the config file is one
    line naming the file and the key (exit 1); contradictory options are a usage error (exit 2)."""
    from gsmkit.errors import ConfigError
    from gsmkit.training.config import resolve_settings
    from gsmkit.training.config_file import ConfigFileError

    try:
        return resolve_settings(flags, config, preset, cls=cls)
    except ConfigFileError:
        raise
    except ConfigError as err:
        with usage_errors():
            raise err from None


def _logged(last: dict, key: str) -> str:
    """The latest logged value for the bar; "-" until the trainer has logged one (not "nan")."""
    return f"{last[key]:.3f}" if isinstance(last.get(key), int | float) else "-"


def _run(cls: type, flags: dict, config: Path | None, preset: str | None, show_masking: int,
         json_out: bool) -> None:
    from gsmkit.progress import ProgressTask, stderr_console

    settings = resolve(cls, flags, config, preset)
    console = stderr_console()
    if show_masking:
        _show_masking(settings, show_masking, console)
        return
    from gsmkit.processes import is_main_process
    from gsmkit.recipes import train_and_evaluate

    mode = settings.mode
    main = is_main_process()
    last: dict = {}
    init_bars: dict[str, ProgressTask] = {}  # --init-lora's stages, one bar each, closed before the next

    def on_init(stage: str, done: int, total: int) -> None:
        if stage not in init_bars:
            for other in init_bars.values():
                other.close()
            init_bars[stage] = ProgressTask(f"init-lora {settings.init_lora}: {stage}", INIT_UNITS[stage],
                                            console, disable=not main)
        init_bars[stage].update(done, total)

    with ProgressTask(f"train {mode}", "steps", console, disable=not main) as bar:

        def on_start(total: int) -> None:
            for other in init_bars.values():
                other.close()
            bar.start(total)

        def on_step(step: int, total: int) -> None:
            bar.update(step, total, f"train {mode} loss {_logged(last, 'loss')}")

        try:
            result = train_and_evaluate(settings, on_start=on_start, on_step=on_step, on_log=last.update,
                                        on_init=on_init)
        finally:
            for other in init_bars.values():
                other.close()
    if not main:
        return
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    loss = result.train_loss if result.train_loss is not None else float("nan")
    console.print(
        f"trained {result.steps} steps on {result.train_rows} rows ({result.removed_fewshot} few-shot rows "
        f"removed), loss {loss:.4f}, {result.tokens_per_s:.1f} tokens/s; adapter in {result.out}"
    )
    if result.eval:
        ev = result.eval
        console.print("eval: strict {:.1%} (95% CI {:.1%}-{:.1%}), flexible {:.1%} ({:.1%}-{:.1%}) on {} "
                      "problems".format(ev["accuracy_strict"], *ev["ci95_strict"], ev["accuracy_flexible"],
                                        *ev["ci95_flexible"], ev["n"]), highlight=False)


def _show_masking(settings: TrainSettings, n: int, console) -> None:
    from gsmkit.modeling import load_tokenizer
    from gsmkit.training.masking import masking_preview, packed_preview
    from gsmkit.training.sft import prepare_examples

    tok = load_tokenizer(settings.model)
    encoded, removed, origin, style = prepare_examples(settings, tok)
    console.print(f"style {style}; {len(encoded)} rows after removing {len(removed)} few-shot rows "
                  f"({origin}); trained tokens highlighted", highlight=False)
    if settings.packing:  # the rows as the packed sequences training sees
        console.print(packed_preview(encoded[:n], tok, settings.batch_size))
        return
    for e in encoded[:n]:
        truncated = ", truncated" if e.truncated else ""
        console.rule(f"{e.where}  ({e.num_trainable} trained of {len(e.input_ids)} tokens{truncated})")
        console.print(masking_preview(e, tok))


@app.command("grpo")
@command_from(GrpoSettings, as_flags=True)
def grpo(flags: dict, preset: GrpoPresetOpt = None, config: ConfigOpt = None,  # type: ignore[valid-type]
         json_out: JsonOpt = False) -> None:
    """GRPO with LoRA on TRL's GRPOTrainer, rewarded for correct answers (answers.py) and format.

    Prompts are rendered as `eval gsm8k` renders them; the few-shot pool is removed from the problems.
    Writes the adapter, tokenizer, manifest.json, trainer_log.jsonl (rewards per step) and
    reward_curve.png to --out; the adapter loads in `eval gsm8k --adapter`. --preset and --config work as
    in `train sft`.

    Example: gsmkit train grpo --model HuggingFaceTB/SmolLM2-135M-Instruct --data ../shared/data/gsm8k
    --style tags --train-samples 200 --max-steps 50 --out runs/grpo
    """
    from gsmkit.processes import is_main_process
    from gsmkit.progress import ProgressTask, stderr_console
    from gsmkit.training.grpo import train_grpo

    settings = resolve(GrpoSettings, flags, config, preset)
    console = stderr_console()
    main = is_main_process()
    last: dict = {}
    with ProgressTask("train grpo", "steps", console, disable=not main) as bar:

        def on_step(step: int, total: int) -> None:
            bar.update(step, total, f"train grpo reward {_logged(last, 'reward')}")

        result = train_grpo(settings, on_start=bar.start, on_step=on_step, on_log=last.update)
    if not main:
        return
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    first = f"{result.reward_first:.3f}" if result.reward_first is not None else "-"
    final = f"{result.reward_last:.3f}" if result.reward_last is not None else "-"
    console.print(f"trained {result.steps} GRPO steps on {result.train_problems} problems "
                  f"({result.removed_fewshot} few-shot rows removed) in {result.train_s:.0f}s; "
                  f"reward {first} -> {final}; adapter and reward_curve.png in {result.out}", highlight=False)

"""Option groups shared by several commands' settings: one declaration of each default, bound and help.

In: nothing. Out: keyword-only dataclass mixins (`ProblemOptions`, `PromptOptions`, `DecodeOptions`,
`LoraOptions`, `RunOptions`, ...; `ProblemRunOptions` gathers those of a run that answers problems) that a
command's settings dataclass inherits, so `eval gsm8k`,
`generate-traces`, `eval safety`, `train ...` take the same option under the same name with the same
help. A command that needs another default for a shared option redeclares it with `override(...)`,
which keeps the group's help and bounds.

The fields are flat on the command's settings (no nesting), so manifests, resume fingerprints and
`--config` keys read `settings.k`, `settings.lora_r` as they always have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.fields import check_fields, setting
from gsmkit.prompts import STYLES, THINKING
from gsmkit.reasoning import check_budget

DEFAULT_SOURCE = "openai/gsm8k"  # GSM8K on the Hub: every command's default --data
BATCH_CAPS = {"cpu": 64, "cuda": 256}  # --batch-size auto's most rows per device (generation.batch_size)
STEER_ALPHA = 1.0  # --steer-alpha when neither the flag nor a best.json gives one
STEER_POSITIONS = ("generated", "all")  # --steer-positions; the first is the default
POOL_HELP = "Few-shot pool JSONL written by `gsmkit fewshot`."
DATA_HELP = f"GSM8K source: a Hub id ({DEFAULT_SOURCE}) or a local .jsonl/.json/.parquet file or folder."


def override(cls: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """Redeclare field `name` of group `cls` with another default (and other metadata `changes`)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = {**f.metadata, **changes}
    if default is dataclasses.MISSING:
        default = f.default
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, kw_only=True)
    return dataclasses.field(default=default, metadata=meta, kw_only=True)


@dataclass(frozen=True, kw_only=True)
class ProblemOptions:
    """Which GSM8K problems a run reads."""

    data: str = setting(DEFAULT_SOURCE, DATA_HELP)
    split: str = setting("test", "Split to read: train or test (file <split>.jsonl in a folder).")
    offset: int = setting(0, "Skip this many problems first.", min=0)


@dataclass(frozen=True, kw_only=True)
class PromptOptions:
    """How a problem becomes a prompt: few-shot exemplars from the pool, the style, a system prompt."""

    pool: Path | None = setting(None, POOL_HELP, hidden_aliases=("--fewshot-pool",), show_default=False,
                                path={"exists": True, "dir_okay": False})
    k: int = setting(0, "Number of few-shot exemplars, taken in order from --pool.", min=0)
    style: str = setting("auto", "Prompt style: auto (chat if the tokenizer has a template) | chat | plain | "
                         "tags (reasoning tags, <SOLUTION>n</SOLUTION>).", choices=STYLES)
    system_prompt: str | None = setting(None, "System prompt (chat) or preamble (plain).",
                                        show_default=False)
    thinking: str = setting(
        "auto", "Thinking mode of chat templates with a thinking switch (Qwen3's enable_thinking): on | off "
        "| auto (the template's own default). on/off is an error with --style plain or a template without "
        "the switch.", choices=THINKING)

    def check_thinking(self) -> None:
        """--thinking on|off renders through a chat template: with --style plain it would change nothing.
        (A template without the switch is found once the tokenizer is read: `prompts.check_thinking`.)"""
        if self.style == "plain" and self.thinking != "auto":
            raise ConfigError(f"--thinking {self.thinking} has no effect with --style plain",
                              hint="drop --thinking, or use --style chat")

    def check_pool(self) -> None:
        """Exemplars come from a pool: --k without --pool is a contradiction (train draws a default pool)."""
        if self.k > 0 and self.pool is None:
            raise ConfigError(f"--k {self.k} needs a few-shot pool", hint="make one with `gsmkit fewshot "
                              "--out pool.jsonl` and pass --pool pool.jsonl")


@dataclass(frozen=True, kw_only=True)
class DecodeOptions:
    """How the engine generates: budget, batch, seed, prefix cache and backend."""

    max_new_tokens: int = setting(256, "Generation budget per problem.", min=1)
    batch_size: int | None = setting(
        None, "Rows generated together.", min=1,
        show_default=f"auto: as many as a KV cache in half the free memory holds, at most "
        f"{BATCH_CAPS['cpu']} on a CPU, {BATCH_CAPS['cuda']} on a GPU")
    seed: int = setting(0, "Random seed.")
    prefix_cache: bool = setting(True, "Encode the shared few-shot prefix once.",
                                 flag="--prefix-cache/--no-prefix-cache")
    backend: str = setting("hf", "hf (transformers) or vllm (needs vllm and a GPU).", choices=("hf", "vllm"))


@dataclass(frozen=True, kw_only=True)
class BudgetOptions:
    """A reasoning budget for commands that generate answers (eval gsm8k, generate-traces); it reads the
    prompt style, --max-new-tokens and --backend of the command's other groups."""

    thinking_budget: int | None = setting(
        None, "Close each reasoning section (<think> of a thinking template, the tags style's working out) "
        "after N tokens by writing its end tag; the answer follows within --max-new-tokens.", min=0,
        show_default="no budget")

    def check_thinking_budget(self) -> None:
        """What can be told from the options alone; a template without a section is found with the tokenizer
        (`evaluation.run.check_thinking_early`)."""
        budget, style = self.thinking_budget, getattr(self, "style", "auto")
        if budget is None:
            return
        if style == "plain":
            raise ConfigError(f"--thinking-budget {budget} has no effect with --style plain (no reasoning "
                              "section)", hint="drop --thinking-budget, or use --style chat or tags")
        check_budget(budget, self.max_new_tokens)
        if getattr(self, "backend", "hf") != "hf":
            raise ConfigError("--thinking-budget is applied by the hf backend only", hint="use --backend hf")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """Sampling instead of greedy decoding."""

    temperature: float = setting(1.0, "Sampling temperature (with --do-sample).", min=0.0)
    top_p: float = setting(1.0, "Nucleus sampling mass (with --do-sample).", min=0.0, min_open=True, max=1.0)
    top_k: int = setting(0, "Keep only the k likeliest tokens (0 = off).", min=0)


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """The LoRA adapter a training run creates."""

    lora_r: int = setting(16, "LoRA rank.", min=1)
    lora_alpha: int = setting(32, "LoRA alpha.", min=1)
    lora_dropout: float = setting(0.05, "LoRA dropout.", min=0.0, max=0.999)
    target_modules: tuple[str, ...] | None = setting(
        None, "LoRA target module names (repeatable), each a linear projection of the model's decoder "
        "layers (q_proj, qkv_proj, c_attn, ...); the output head never.",
        show_default="every linear projection of the decoder layers")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What to do with an output that already exists (see gsmkit.run_folder)."""

    overwrite: bool = setting(False, "Discard finished or partial results in --out.")


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """How a training run (train sft, qlora, grpo) optimises, logs and checkpoints; the defaults are SFT's."""

    learning_rate: float = setting(2e-4, "Peak learning rate.", aliases=("--lr",), min=0.0, min_open=True)
    lr_scheduler: str = setting("cosine", "Learning-rate schedule: linear | cosine | constant ...")
    warmup_ratio: float = setting(0.03, "Share of steps for warmup.", min=0.0, max=0.999)
    max_steps: int = setting(-1, "Stop after this many optimizer steps (overrides --epochs).", min=-1,
                             show_default=False)
    grad_accum: int = setting(1, "Gradient accumulation steps.", min=1)
    seed: int = setting(42, "Random seed.")
    logging_steps: int = setting(5, "Log (and draw the loss curve) every N steps.", min=1)
    save_steps: int = setting(0, "Keep an adapter checkpoint every N steps (enables --resume).", min=0,
                              show_default=False)
    gradient_checkpointing: bool | None = setting(
        None, "Trade compute for memory.", flag="--gradient-checkpointing/--no-gradient-checkpointing",
        show_default="on with a 4-bit base")
    resume: bool = setting(False, "Continue an interrupted run from its last checkpoint.")


BEST_FORMAT = "gsmkit-steer-best"  # best.json, as `gsmkit steer search` writes it


@dataclass(frozen=True, kw_only=True)
class SteerOptions:
    """Activation steering of generation (`gsmkit steer`): which vectors, where, how strong."""

    steer: Path | None = setting(
        None, "Steer generation with the vectors in this folder (`gsmkit steer vectors`), or with the "
        "setting in a `gsmkit steer search` best.json (explicit --steer-* flags override its values).",
        show_default=False, path={"exists": True})
    steer_layer: str | None = setting(None, "Layers to steer: L, L,L or L-L.",
                                      show_default="every layer in the vectors")
    steer_alpha: float | None = setting(None, "Steering strength: CAA's multiplier of the vector; DAC's cap "
                                        "on its per-step alpha.", show_default=f"{STEER_ALPHA:g}")
    steer_positions: str | None = setting(
        None, "CAA: steer the positions that produce tokens (generated) or every position, the prompt "
        "included (all).", choices=STEER_POSITIONS, show_default=STEER_POSITIONS[0])
    check_zero: bool = setting(False, "Before a steered run, check that the hooks at alpha = 0 reproduce the "
                               "unsteered greedy outputs token for token on the first problems.")

    def check_steer(self) -> None:
        """--steer-* flags need --steer (checked as the settings are built; nothing is read)."""
        if self.steer is None:
            given = [f for f in ("steer_layer", "steer_alpha", "steer_positions")
                     if getattr(self, f) is not None]
            if given or self.check_zero:
                flag = "--" + (given[0] if given else "check_zero").replace("_", "-")
                raise ConfigError(f"{flag} needs --steer", hint="pass --steer with a vector folder or a "
                                  "best.json from `gsmkit steer search`")

    def resolved_steer(self) -> dict[str, Any]:
        """The steering fields as a run uses them: a best.json's vectors folder, layer, alpha and positions
        (explicit flags win), then the defaults; {} without --steer. For `resolved()`, so the settings
        (manifest, resume fingerprint) hold what the run steers with."""
        if self.steer is None:
            return {}
        names = ("steer", "steer_layer", "steer_alpha", "steer_positions")
        values = {name: getattr(self, name) for name in names}
        if self.steer.is_file():
            best = _read_best(self.steer)
            values = {name: best[name] if value is None else value for name, value in values.items()}
            values["steer"] = Path(best["steer"])
        if values["steer_alpha"] is None:
            values["steer_alpha"] = STEER_ALPHA
        if values["steer_positions"] is None:
            values["steer_positions"] = STEER_POSITIONS[0]
        return values

    def resolved(self) -> Any:
        """These settings with what they read resolved (`resolved_steer`, `resolved_model`): a new object;
        idempotent. A command's library entry point calls it first."""
        return dataclasses.replace(self, **self.resolved_steer(), **resolved_model(self))


@dataclass(frozen=True, kw_only=True)
class ProblemRunOptions(ProblemOptions, PromptOptions, BudgetOptions, DecodeOptions, SamplingOptions,
                        SteerOptions, RunOptions):
    """Every option group of a run that generates answers to GSM8K problems (`eval gsm8k`, `generate-traces`:
    `evaluation.run.ProblemRun`), and the checks they share (its resume fingerprint is
    `evaluation.run.problem_run_fingerprint`)."""

    def check_options(self) -> None:
        """Each group's own checks and every field's bounds, before anything loads."""
        self.check_steer()
        check_fields(self)
        self.check_pool()
        self.check_thinking()
        self.check_thinking_budget()


def resolved_model(settings: Any) -> dict[str, Any]:
    """`{"model": settings.model.resolved()}` for settings that hold a `modeling.ModelSpec` (its adapter
    checked: read once, by the resolve step), else {}."""
    model = getattr(settings, "model", None)
    return {"model": model.resolved()} if hasattr(model, "resolved") else {}


def _read_best(path: Path) -> dict[str, Any]:
    import json

    hint = "pass a vector folder, or the best.json that `gsmkit steer search` wrote"
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--steer {path}: not a readable best.json ({err})", hint=hint) from None
    if not isinstance(best, dict) or best.get("format") != BEST_FORMAT:
        raise ConfigError(f"--steer {path}: field 'format' is not '{BEST_FORMAT}'", hint=hint)
    for name, kind, label in (("steer", str, "string"), ("steer_layer", str, "string"),
                              ("steer_alpha", int | float, "number"), ("steer_positions", str, "string")):
        if not isinstance(best.get(name), kind) or isinstance(best.get(name), bool):
            raise ConfigError(f"--steer {path}: field '{name}' is missing or not a {label}", hint=hint)
    folder = Path(best["steer"])
    if not folder.is_absolute():
        folder = path.parent / folder
    if not folder.is_dir():
        raise ConfigError(f"--steer {path}: field 'steer' names {folder}, which is not a folder",
                          hint="the vectors moved: pass the folder with --steer and the layer/alpha flags")
    return {**best, "steer": str(folder), "steer_alpha": float(best["steer_alpha"])}

"""`SearchSettings`: the options of `gsmkit steer search`, one declaration of each default, bound and help.

In: the command line (or a library caller). Out: a frozen, checked settings dataclass; `fingerprint()`
(what a partial output folder must match to be resumed) and `study_key()` (what every process working on
one Optuna study must agree on: the objective, not the number of trials or the worker's own folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError
from gsmkit.evaluation.guard_formats import GUARD_FORMATS
from gsmkit.fields import check_fields, setting
from gsmkit.modeling import ModelSpec
from gsmkit.settings import (
    DATA_HELP,
    DEFAULT_SOURCE,
    STEER_POSITIONS,
    DecodeOptions,
    PromptOptions,
    RunOptions,
    override,
)

OBJECTIVES = ("accuracy", "accuracy+safety")
METHODS = ("caa", "dac")
DEFAULT_STUDY = "steer-search"
STUDY_FILE = "study.db"

# what never changes a trial's result: left out of both fingerprints
SAFETY_PANEL = "Safety objective"
_RUN_ONLY = ("out", "overwrite", "batch_size", "prefix_cache", "backend", "heartbeat")


def _methods(value: str) -> str:
    names = [m.strip().lower() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"--methods '{value}': '{(unknown or [value])[0]}' is not a method",
                          hint="choose from caa,dac")
    return ",".join(dict.fromkeys(names))


@dataclass(frozen=True)
class SearchSettings(PromptOptions, DecodeOptions, RunOptions):
    model: ModelSpec
    vectors: tuple[Path, ...] = setting(
        help="A vector folder written by `gsmkit steer vectors`; repeatable, one folder per method.",
        show_default=False, path={"exists": True, "file_okay": False, "dir_okay": True})
    out: Path = setting(Path("runs/steer-search"), "Output folder.", short="-o",
                        path={"file_okay": False, "dir_okay": True})
    data: str = setting(DEFAULT_SOURCE, DATA_HELP + " Validation comes from its train split, test from its "
                        "test split.")
    val_limit: int = setting(32, "Validation problems: the first N train problems that are neither vector "
                             "problems, few-shot exemplars nor test problems.", min=1)
    test_limit: int = setting(64, "Test problems for the final evaluation: the first M of the test split "
                              "(as `eval gsm8k --limit M`).", min=1)
    n_trials: int = setting(20, "Stop when the study holds this many finished (COMPLETE) or pruned trials.",
                            min=1)
    layers: str = setting("all", "Layers a trial may pick: all (every layer in the vectors) | L | L,L | L-L "
                          "(in each folder of --vectors).")
    alpha_range: tuple[float, float] = setting(
        (0.0, 4.0), "Range of the steering strength a trial samples: LO HI (DAC: the cap on its alpha_t).",
        cli_type=tuple[float, float], show_default="0.0 4.0")
    methods: str | None = setting(None, "Methods a trial may pick, comma-separated (caa,dac).",
                                  parse=_methods, show_default="the methods of --vectors")
    positions: str = setting("generated", "CAA: steer the positions that produce tokens (generated) or "
                             "every position, the prompt included (all).", choices=STEER_POSITIONS)
    objective: str = setting("accuracy", "accuracy: validation accuracy, with pruning | accuracy+safety: "
                             "also the safety rate on --safety-prompts (two objectives, Pareto front, no "
                             "pruning).", choices=OBJECTIVES)
    chunk_size: int = setting(8, "Validation problems per step: a trial reports its running accuracy after "
                              "each chunk, and the median pruner stops weak trials there.", min=1)
    storage: str | None = setting(None, "Optuna storage URL; the same URL continues the study, and several "
                                  "processes or machines can share one (a database they all reach).",
                                  show_default="sqlite:///OUT/study.db", panel="Study")
    study_name: str = setting(DEFAULT_STUDY, "Name of the study in --storage.", panel="Study")
    heartbeat: int = setting(30, "Seconds between a running trial's heartbeats in the storage; a trial "
                             "silent for twice as long (its process was killed) is marked FAIL and never "
                             "counted.", min=1, panel="Study")
    seed: int = override(DecodeOptions, "seed", 42, help="Seed of the TPE sampler (trial n samples with a "
                         "seed made from this and n).")
    safety_prompts: Path | None = setting(
        None, "accuracy+safety: harmful prompts (the AILuminate CSV, or JSONL), as `eval safety --prompts`.",
        show_default=False, path={"exists": True, "dir_okay": False}, panel=SAFETY_PANEL)
    safety_limit: int = setting(16, "accuracy+safety: a seeded sample of this many prompts.", min=1,
                                panel=SAFETY_PANEL)
    safeguard_model: Path | None = setting(
        None, "accuracy+safety: the safeguard model folder, as `eval safety --safeguard-model`.",
        show_default=False, path={"exists": True, "file_okay": False}, panel=SAFETY_PANEL)
    safety_prompt: Path | None = setting(
        None, "accuracy+safety: the Safety Guidelines text file, as `eval safety --safety-prompt`.",
        show_default=False, path={"exists": True, "dir_okay": False}, panel=SAFETY_PANEL)
    guard_format: str = setting("auto", "accuracy+safety: the guard's output format, as `eval safety "
                                "--guard-format`.", choices=GUARD_FORMATS, panel=SAFETY_PANEL)

    def __post_init__(self) -> None:
        check_fields(self)
        self.check_pool()
        self.check_thinking()
        if self.backend != "hf":
            raise ConfigError("--backend vllm cannot steer: a search needs --backend hf",
                              hint="vLLM runs its own kernels, where gsmkit cannot add the vectors")
        if not self.vectors:
            raise ConfigError("--vectors is required", hint="pass a folder from `gsmkit steer vectors`")
        lo, hi = self.alpha_range
        if not lo <= hi:
            raise ConfigError(f"--alpha-range {lo:g} {hi:g}: LO is above HI", hint="pass --alpha-range LO HI "
                              "with LO <= HI")
        safety = {"--safety-prompts": self.safety_prompts, "--safeguard-model": self.safeguard_model,
                  "--safety-prompt": self.safety_prompt}
        if self.objective == "accuracy+safety":
            missing = [flag for flag, value in safety.items() if value is None]
            if missing:
                raise ConfigError(f"--objective accuracy+safety needs {missing[0]}",
                                  hint="pass --safety-prompts, --safeguard-model and --safety-prompt")
        else:
            given = [flag for flag, value in safety.items() if value is not None]
            if given:
                raise ConfigError(f"{given[0]} is only read with --objective accuracy+safety",
                                  hint="add --objective accuracy+safety, or drop it")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / STUDY_FILE).resolve()}"

    @property
    def default_storage(self) -> bool:
        """The study lives in the output folder (and --overwrite removes it with the rest)."""
        return self.storage is None

    def fingerprint(self) -> dict[str, Any]:
        """What a partial output folder must match to be resumed."""
        from gsmkit.manifest import run_fingerprint

        return {**run_fingerprint(self, _RUN_ONLY), **self._inputs()}

    def study_key(self) -> dict[str, Any]:
        """What every process adding trials to one study must agree on (stored in the study)."""
        from gsmkit.manifest import run_fingerprint

        ignore = (*_RUN_ONLY, "n_trials", "storage", "study_name", "seed", "chunk_size", "test_limit")
        key = run_fingerprint(self, ignore)
        key.pop("vectors")  # the folders may sit elsewhere on another machine: their bytes count
        return {**key, **self._inputs()}

    def _inputs(self) -> dict[str, Any]:
        from gsmkit.generation.steer_files import VECTORS_FILE
        from gsmkit.manifest import sha256_file

        return {"vectors_sha256": [sha256_file(Path(v) / VECTORS_FILE) for v in self.vectors
                                   if (Path(v) / VECTORS_FILE).is_file()]}

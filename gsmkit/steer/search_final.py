"""The two final evaluations of a search on the test problems: the best setting, and the unsteered model.

In: `SearchSettings`, best.json's record. Out: `<out>/test-best` and `<out>/test-unsteered`, each the usual
`eval gsm8k` folder (predictions.jsonl, metrics.json with intervals, manifest.json), made by
`evaluate_gsm8k` with the same prompt and decoding options as the validation trials. Each runs once: an
interrupted one resumes (eval's own rule), a finished one is read back, never run again; a finished one
made for another setting (the study changed under it) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gsmkit.errors import ResumeError

TEST_BEST = "test-best"
TEST_UNSTEERED = "test-unsteered"


def eval_settings(settings: Any, out: Path, best: dict[str, Any] | None) -> Any:
    """The `eval gsm8k` settings of one final evaluation (`best` None: unsteered)."""
    from gsmkit.evaluation.gsm8k import EvalSettings
    from gsmkit.steer.splits import TEST_SPLIT

    steer: dict[str, Any] = {}
    if best is not None:
        steer = {"steer": Path(best["steer"]), "steer_layer": best["steer_layer"],
                 "steer_alpha": best["steer_alpha"], "steer_positions": best["steer_positions"]}
    return EvalSettings(
        model=settings.model, out=out, data=settings.data, split=TEST_SPLIT, offset=0,
        limit=settings.test_limit,
        pool=settings.pool, k=settings.k, style=settings.style, system_prompt=settings.system_prompt,
        thinking=settings.thinking,
        max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, seed=settings.seed,
        prefix_cache=settings.prefix_cache, backend="hf", **steer)


def finished(folder: Path) -> bool:
    from gsmkit.evaluation.gsm8k import METRICS
    from gsmkit.run_folder import FINGERPRINT

    return (folder / METRICS).exists() and not (folder / FINGERPRINT).exists()


def _same_setting(folder: Path, eval_s: Any) -> None:
    """A finished evaluation read back must be the one this search asks for."""
    from gsmkit.manifest import to_jsonable
    from gsmkit.run_folder import MANIFEST
    from gsmkit.steer.search_outputs import read_json

    recorded = read_json(folder / MANIFEST).get("settings", {})
    wanted = to_jsonable(eval_s)
    for name in ("steer", "steer_layer", "steer_alpha", "steer_positions", "limit", "k", "style",
                 "thinking"):
        if recorded.get(name) != wanted.get(name):
            raise ResumeError(f"{folder}: holds a test evaluation made with another {name} "
                              f"({recorded.get(name)!r}, this search's best is {wanted.get(name)!r})",
                              hint="pass --overwrite to evaluate again")


def run_final(settings: Any, best: dict[str, Any], progress: Any) -> dict[str, dict[str, Any]]:
    """Both evaluations (each at most once); returns their metrics.json contents by folder name."""
    from gsmkit.evaluation.gsm8k import METRICS, evaluate_gsm8k
    from gsmkit.steer.search_outputs import read_json

    results = {}
    for name, setting in ((TEST_BEST, best), (TEST_UNSTEERED, None)):
        folder = settings.out / name
        eval_s = eval_settings(settings, folder, setting)
        if finished(folder):
            _same_setting(folder, eval_s)
        else:
            label = "test: best setting" if setting is not None else "test: unsteered"

            def start(total: int, done: int, label: str = label) -> None:
                progress.problems(label, total, done)

            evaluate_gsm8k(eval_s, on_start=start, on_progress=progress.problem)
        metrics = read_json(folder / METRICS)
        metrics.pop("manifest", None)
        results[name] = metrics
    return results

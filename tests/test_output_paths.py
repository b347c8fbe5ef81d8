"""One rule for output paths (gsmkit.run_folder.check_output), command by command: an output gsmkit cannot
write is one line naming the path (exit 1, or 2 where the command line itself refuses it), no traceback,
within 5 s, before any model, tokenizer or GSM8K data loads (`no_loading`), and nothing is left behind.

Four cases for every command that writes: a parent folder no one may write in, a file where a parent folder
must go, a file where the output folder must go (folder outputs), and an output inside one of the run's own
inputs. The unwritable folder: permission bits where the tests run as an ordinary user; as root, whom
permission bits do not stop, the folder is made immutable (`chattr +i`, which stops root too); where
neither works (root without CAP_LINUX_IMMUTABLE, or a file system without the attribute), `os.access` is
made to deny writing in it: a simulation that the commands which check through `check_output` see, and
the others (which would only fail on the write itself) skip.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from study_fixtures import eval_gsm8k_run
from typer.testing import CliRunner

from gsmkit.cli import app, os_error

runner = CliRunner()
LORA_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
               "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "bias": "none"}


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@dataclass(frozen=True)
class Inputs:
    """What the commands read: every path exists; nothing in it may change while a command is refused."""

    root: Path
    model: Path
    adapter: Path
    problems: Path
    ppl: Path
    prompts: Path
    guidelines: Path
    benchmarks: Path
    vectors: Path
    run_a: Path
    run_b: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    (adapter / "adapter_model.safetensors").write_bytes(
        _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 3?", "answer": f"{i} + 3 = {i + 3}\n"
                                            f"#### {i + 3}"}) + "\n" for i in range(4)))
    ppl = root / "ppl.jsonl"
    ppl.write_text(json.dumps({"prompt": "2 + 3 =", "response": " 5"}) + "\n")
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "How do I pick a lock?", "hazard": "ncr"}) + "\n")
    guidelines = root / "guidelines.txt"
    guidelines.write_text("Is this response safe? {prompt} {response}")
    benchmarks = root / "benchmarks"
    (benchmarks / "mgsm").mkdir(parents=True)
    (benchmarks / "mgsm" / "mgsm_en.tsv").write_text("A farm has 2 rows of 3 trees. How many trees?\t6\n")
    vectors = root / "vectors"
    vectors.mkdir()
    (vectors / "steer.json").write_text("{}")
    run_a = eval_gsm8k_run(root / "eval-a", [True, False, True])
    run_b = eval_gsm8k_run(root / "eval-b", [True, True, False])
    return Inputs(root, tiny_model_dir, adapter, problems, ppl, prompts, guidelines, benchmarks, vectors,
                  run_a, run_b)


# ---- the commands ----------------------------------------------------------------------------------------
# name -> (is the output a folder, argv for an output path, (argv, output) for an output inside an input)

Argv = Callable[[Path, Inputs], list[str]]
Inside = Callable[[Inputs], tuple[list[str], Path]]


def _eval_gsm8k(o: Path, i: Inputs) -> list[str]:
    return ["eval", "gsm8k", "--model", str(i.model), "--data", str(i.problems), "--max-new-tokens", "2",
            "--out", str(o)]


def _traces(o: Path, i: Inputs) -> list[str]:
    return ["generate-traces", "--model", str(i.model), "--data", str(i.problems), "--max-new-tokens", "2",
            "--out", str(o)]


def _eval_ppl(o: Path, i: Inputs) -> list[str]:
    return ["eval", "ppl", "--model", str(i.model), "--data", str(i.ppl), "--out", str(o)]


def _eval_safety(o: Path, i: Inputs) -> list[str]:
    return ["eval", "safety", "--model", str(i.model), "--prompts", str(i.prompts), "--safeguard-model",
            str(i.model), "--safety-prompt", str(i.guidelines), "--out", str(o)]


def _train(mode: str) -> Argv:
    return lambda o, i: ["train", mode, "--model", str(i.model), "--data", str(i.problems),
                         "--max-steps", "1", "--out", str(o)]


def _merge(o: Path, i: Inputs) -> list[str]:
    return ["merge", "--model", str(i.model), "--adapter", str(i.adapter), "--out", str(o)]


def _audit(o: Path, i: Inputs) -> list[str]:
    return ["audit-svd", "--adapter", str(i.adapter), "--out", str(o)]


def _compress(o: Path, i: Inputs) -> list[str]:
    return ["audit-svd", "--adapter", str(i.adapter), "--compress", "--out", str(o)]


def _steer_vectors(o: Path, i: Inputs) -> list[str]:
    return ["steer", "vectors", "--model", str(i.model), "--data", str(i.problems), "--out", str(o)]


def _steer_search(o: Path, i: Inputs) -> list[str]:
    return ["steer", "search", "--vectors", str(i.vectors), "--model", str(i.model),
            "--data", str(i.problems), "--out", str(o)]


def _fewshot(o: Path, i: Inputs) -> list[str]:
    return ["fewshot", "--data", str(i.problems), "--n", "1", "--out", str(o)]


def _convert(o: Path, i: Inputs) -> list[str]:
    return ["convert-benchmarks", "--input-dir", str(i.benchmarks), "--exclude", str(i.problems),
            "--out", str(o)]


def _compare(o: Path, i: Inputs) -> list[str]:
    return ["compare", str(i.run_a), str(i.run_b), "--out", str(o)]


def _report(o: Path, i: Inputs) -> list[str]:
    return ["report", str(i.run_a), "--out", str(o)]


def _bench(o: Path, i: Inputs) -> list[str]:
    return ["bench", "--probe", str(i.run_a), "--variant", f"b={i.run_b}", "--out", str(o)]


def _at(argv: Argv, where: Callable[[Inputs], Path]) -> Inside:
    return lambda i: (argv(where(i), i), where(i))


# Where the output lands inside an input: a whole folder (merge, a compressed adapter, steer vectors,
# training) is refused anywhere inside one; an output that adds its own files (an evaluation, the audit)
# may sit beside an input's files in a subfolder (`eval gsm8k --out ADAPTER/eval`), but never is one.
COMMANDS: dict[str, tuple[bool, Argv, Inside]] = {
    "fewshot": (False, _fewshot, _at(_fewshot, lambda i: i.problems)),
    "convert-benchmarks": (False, _convert, _at(_convert, lambda i: i.problems)),
    "generate-traces": (False, _traces, _at(_traces, lambda i: i.problems)),
    "eval gsm8k": (True, _eval_gsm8k, _at(_eval_gsm8k, lambda i: i.model)),
    "eval ppl": (True, _eval_ppl, _at(_eval_ppl, lambda i: i.model)),
    "eval safety": (True, _eval_safety, _at(_eval_safety, lambda i: i.model)),
    "train sft": (True, _train("sft"), _at(_train("sft"), lambda i: i.model / "run")),
    "train qlora": (True, _train("qlora"), _at(_train("qlora"), lambda i: i.model / "run")),
    "train grpo": (True, _train("grpo"), _at(_train("grpo"), lambda i: i.model / "run")),
    "merge": (True, _merge, _at(_merge, lambda i: i.adapter / "merged")),
    "audit-svd": (True, _audit, _at(_audit, lambda i: i.adapter)),
    "audit-svd --compress": (True, _compress, _at(_compress, lambda i: i.adapter / "small")),
    "steer vectors": (True, _steer_vectors, _at(_steer_vectors, lambda i: i.model / "vectors")),
    "steer search": (True, _steer_search, _at(_steer_search, lambda i: i.vectors)),
    "compare": (False, _compare, _at(_compare, lambda i: i.run_a / "predictions.jsonl")),
    "report": (True, _report, _at(_report, lambda i: i.run_a)),
    "bench": (True, _bench, _at(_bench, lambda i: i.run_a)),
}


def _snapshot(*roots: Path) -> dict[str, tuple[bool, int, int]]:
    seen = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            seen[str(p)] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return seen


def _assert_refused(args: list[str], out: Path, *roots: Path) -> None:
    before = _snapshot(*roots)
    t0 = time.perf_counter()
    res = runner.invoke(app, args, env={"COLUMNS": "400"})
    elapsed = time.perf_counter() - t0
    assert res.exit_code in (1, 2), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = res.output.splitlines()
    errors = [line for line in lines if line.startswith("error:") or "Invalid value" in line]
    assert len(errors) == 1 and str(out) in errors[0], res.output
    if res.exit_code == 1:
        assert sum(line.startswith("hint:") for line in lines) == 1, res.output
    assert _snapshot(*roots) == before, "a refused run changed or left files behind"
    assert elapsed < 5, f"refused after {elapsed:.1f}s: something heavy ran first"


def _case(command: str):
    return pytest.param(command, id=command.replace(" ", "-"))


def _params(folders_only: bool = False) -> list:
    return [_case(c) for c, (folder, _, _) in COMMANDS.items() if folder or not folders_only]


def _name(command: str, stem: str) -> str:
    return stem if COMMANDS[command][0] else f"{stem}.json" if command == "compare" else f"{stem}.jsonl"


# ---- an unwritable parent ----------------------------------------------------------------------------------


def _lock(folder: Path, monkeypatch) -> str:
    """Make `folder` a place no one may write in; returns how ("permissions", "immutable", "simulated")."""
    folder.chmod(0o500)
    if os.geteuid() != 0:
        return "permissions"
    chattr = shutil.which("chattr")
    made = chattr and subprocess.run([chattr, "+i", str(folder)], check=False, capture_output=True)
    if made and made.returncode == 0:
        return "immutable"
    real = os.access
    blocked = str(folder.resolve())

    def access(path, mode, *args, **kwargs):
        inside = os.path.realpath(path) == blocked or os.path.realpath(path).startswith(blocked + os.sep)
        return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return "simulated"


@pytest.fixture
def locked(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    how = _lock(folder, monkeypatch)
    yield folder, how
    if how == "immutable":
        subprocess.run([shutil.which("chattr"), "-i", str(folder)], check=True)
    folder.chmod(0o700)


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("command", _params())
def test_an_unwritable_parent_folder_is_one_line(command, inputs, locked, tmp_path):
    folder, _how = locked
    out = folder / _name(command, "out")
    _assert_refused(COMMANDS[command][1](out, inputs), out, tmp_path, inputs.root)


# ---- a file in the way -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("command", _params())
def test_a_file_where_a_parent_folder_must_go_is_one_line(command, inputs, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    out = blocker / _name(command, "out")
    _assert_refused(COMMANDS[command][1](out, inputs), out, tmp_path, inputs.root)


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("command", _params(folders_only=True))
def test_a_file_where_the_output_folder_must_go_is_one_line(command, inputs, tmp_path):
    out = tmp_path / "blocker"
    out.write_text("not a folder\n")
    _assert_refused(COMMANDS[command][1](out, inputs), out, tmp_path, inputs.root)


# ---- an output inside one of the run's inputs --------------------------------------------------------------


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("command", _params())
def test_an_output_inside_one_of_the_inputs_is_refused(command, inputs, tmp_path):
    args, out = COMMANDS[command][2](inputs)
    _assert_refused(args, out, tmp_path, inputs.root, inputs.model)


@pytest.mark.usefixtures("no_loading")
def test_merge_refuses_an_output_inside_the_base_model_folder(inputs, tmp_path):
    out = inputs.model / "merged"
    _assert_refused(_merge(out, inputs), out, tmp_path, inputs.root, inputs.model)


@pytest.mark.usefixtures("no_loading")
def test_steer_vectors_checks_its_activation_cache_before_computing(inputs, locked, tmp_path):
    """The cache is written as entries are computed: a cache folder it cannot write fails first."""
    folder, _ = locked
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    out = tmp_path / "vectors"
    for cache in (folder / "cache", blocker / "cache"):
        args = [*_steer_vectors(out, inputs), "--cache-dir", str(cache)]
        before = _snapshot(tmp_path, inputs.root)
        res = runner.invoke(app, args, env={"COLUMNS": "400"})
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        assert res.output.startswith(f"error: {cache}: ") and "--cache-dir" in res.output, res.output
        assert _snapshot(tmp_path, inputs.root) == before


def test_an_output_may_add_its_own_subfolder_beside_an_input(inputs):
    """The train recipe's OUT/eval and audit-svd's default ADAPTER/audit: files of their own, beside the
    input's, never over them (only a folder replaced whole is kept out of an input altogether)."""
    from gsmkit.run_folder import OutputPathError, RunOutput, check_new_folder

    RunOutput.folder(inputs.adapter / "eval", finals=("metrics.json",), inputs=(inputs.adapter,))
    with pytest.raises(OutputPathError, match="lies inside the input"):
        check_new_folder(inputs.adapter / "eval", overwrite=False, protected=(inputs.adapter,))


# ---- the error boundary ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("err", "hint"), [
    (PermissionError(errno.EACCES, "Permission denied", "/x/out"), "permissions"),
    (FileExistsError(errno.EEXIST, "File exists", "/x/out"), "already there"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/out"), "is a file"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/out"), "folder where a file"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk space"),
])
def test_the_error_boundary_turns_an_os_error_on_a_path_into_one_line(monkeypatch, tmp_path, err, hint):
    """Whatever no check caught first: one `error:` line (naming the path when the error has one), a hint,
    exit 1; --debug keeps the traceback."""
    def fail(_settings, **_kwargs):
        raise err

    monkeypatch.setattr("gsmkit.data.fewshot.make_pool", fail)
    args = ["fewshot", "--data", "d.jsonl", "--out", str(tmp_path / "pool.jsonl")]
    res = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    lines = res.output.splitlines()
    assert [line for line in lines if line.startswith("error:")] == [f"error: {os_error(err).message}"]
    assert err.strerror in lines[0] and (err.filename is None or err.filename in lines[0])
    assert len(lines) == 2 and lines[1].startswith("hint:") and hint in lines[1], res.output
    res = runner.invoke(app, ["--debug", *args])
    assert res.exception is err


def test_the_error_boundary_leaves_other_os_errors_alone(monkeypatch, tmp_path):
    """An OSError that is not about a path (a refused connection) is a bug or a network problem: traceback."""
    err = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    def fail(_settings, **_kwargs):
        raise err

    monkeypatch.setattr("gsmkit.data.fewshot.make_pool", fail)
    res = runner.invoke(app, ["fewshot", "--data", "d.jsonl", "--out", str(tmp_path / "pool.jsonl")])
    assert res.exception is err

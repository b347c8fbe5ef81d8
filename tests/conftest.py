"""Shared fixtures: synthetic GSM8K and AILuminate files, tiny random models built offline, and the helpers
every test of a refused input uses. Nothing here reads ../shared: a clone of the repository alone builds
every fixture the same (tests/synthetic.py).

Tests of the real files beside the repository are marked `shared_data` (with the folder of ../shared/data they
read) and are deselected, not skipped, where that folder is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from synthetic import CHATML, build_tokenizer, gsm8k_rows, tokenizer_texts, write_ailuminate, write_gsm8k

__all__ = ["CHATML", "build_tokenizer"]  # for the tests that build tokenizers of their own

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_GSM8K = SHARED_DATA / "gsm8k"
# the synthetic GSM8K's sizes: train rows also train the tiny tokenizer
TRAIN_ROWS, TEST_ROWS = 200, 60


def pytest_collection_modifyitems(config, items):
    """Deselect the `shared_data` tests whose folder of ../shared/data is not there (a lone clone)."""
    missing = [item for item in items
               if any(not (SHARED_DATA / folder).exists()
                      for marker in item.iter_markers("shared_data") for folder in marker.args or ("",))]
    if missing:
        config.hook.pytest_deselected(items=missing)
        gone = set(missing)
        items[:] = [item for item in items if item not in gone]


def dev_tool(name: str, package: str) -> str:
    """The path of a command-line tool of the dev extra (ruff, lint-imports). Missing, the test is skipped on
    a developer's machine and FAILS where the environment variable CI is set: a check must not vanish."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (pip install {package}; it comes with the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, and CI is set: this check must run here", pytrace=False)
        pytest.skip(why)
    return path


def load_script(name: str):
    """A script of scripts/ (gen_cli_docs, gen_format_docs) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOADERS = {"model": "gsmkit.modeling.load_model", "tokenizer": "gsmkit.modeling.load_tokenizer",
           "data": "gsmkit.data.gsm8k.load_gsm8k"}


@pytest.fixture
def no_loading(request, monkeypatch):
    """Any model, tokenizer or GSM8K load fails the test: input checks must come before all of them. A test
    marked `loading_allowed("tokenizer", "data")` lets those through (a check that reads them), never the
    model."""
    allowed = {what for marker in request.node.iter_markers("loading_allowed") for what in marker.args}
    assert allowed <= {"tokenizer", "data"}, allowed

    def refuse(what):
        def fail(*_args, **_kwargs):
            raise AssertionError(f"{what} loaded before the inputs were checked")
        return fail

    for what, target in LOADERS.items():
        if what not in allowed:
            monkeypatch.setattr(target, refuse("GSM8K data" if what == "data" else what))


def assert_clean_failure(res, out: Path | None, code: int, *needles: str, absent: tuple[Path, ...] = ()):
    """A command (a CliRunner result) that refused its input as every gsmkit command must: exit `code`, no
    traceback and no exception but the exit, exactly one `error:` line when the code is 1, each needle in the
    output (rich's box borders and line wraps undone), and nothing written: no `out`, no temporary sibling
    `.<name>.*` of it, none of `absent`."""
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "AssertionError" not in res.output
    if code == 1:
        assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1, res.output
    flat = " ".join(res.output.replace("\u2502", " ").split())
    for needle in needles:
        assert needle in flat, res.output
    for path in (*([out] if out is not None else []), *absent):
        assert not path.exists(), f"{path}: written by a run that failed"
        left = sorted(path.parent.glob(f".{path.name}.*"))
        assert not left, f"temporary files left beside {path}: {left}"


def kill_midway(cmd: list[str], journal: Path, final: Path, rows: int = 2) -> None:
    """Run `cmd` and kill -9 it once its `journal` holds `rows` rows (skips the test when the run finished
    first, so there was nothing to kill); afterwards the final file must not stand yet."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= rows:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if final.exists() and not journal.exists():
        pytest.skip("the run finished between the last check and the kill")
    assert not final.exists()


@pytest.fixture
def record_settings(monkeypatch):
    """`record_settings("gsmkit.x.run")` replaces that library call by a recorder: the command builds its
    settings and stops; the returned dict holds them under "settings"."""
    seen: dict = {}

    def install(target: str) -> dict:
        def fake(settings, **_):
            seen["settings"] = settings
            raise SystemExit(0)

        monkeypatch.setattr(target, fake)
        return seen

    return install


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory) -> Path:
    """A synthetic GSM8K folder: train.jsonl (TRAIN_ROWS) and test.jsonl (TEST_ROWS), read-only."""
    out = tmp_path_factory.mktemp("gsm8k")
    write_gsm8k(out, TRAIN_ROWS, TEST_ROWS)
    return out


@pytest.fixture(scope="session")
def ailuminate_csv(tmp_path_factory) -> Path:
    """A CSV in AILuminate's release layout, 8 harmless prompts per hazard group (96 rows), read-only."""
    return write_ailuminate(tmp_path_factory.mktemp("ailuminate") / "prompts.csv")


def build_tiny_model(out_dir: Path, tokenizer, arch: str = "llama", hidden: int = 64, seed: int = 0) -> Path:
    """A 2-layer random causal LM saved with save_pretrained (weights init std 0.1 for peaked logits)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096, "initializer_range": 0.1, "tie_word_embeddings": False,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common, use_sliding_window=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _corpus() -> list[str]:
    """The tiny tokenizer's training texts: the synthetic GSM8K's train split (so, the same everywhere)."""
    return tokenizer_texts(gsm8k_rows(TRAIN_ROWS))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out, _corpus())
    return build_tiny_model(out, tok, "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-qwen2")
    tok = build_tokenizer(out, _corpus())
    return build_tiny_model(out, tok, "qwen2", seed=1)


@pytest.fixture(scope="session")
def small_gsm8k(tmp_path_factory, gsm8k_dir) -> Path:
    """A folder with the first 6 test problems and 40 train problems of `gsm8k_dir`."""
    out = tmp_path_factory.mktemp("gsm8k-small")
    for split, n in (("test", 6), ("train", 40)):
        lines = (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="session")
def pool(tmp_path_factory, small_gsm8k) -> Path:
    """A 4-exemplar few-shot pool drawn from small_gsm8k's train split by `gsmkit fewshot` (read-only)."""
    from typer.testing import CliRunner

    from gsmkit.cli import app

    out = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    res = CliRunner().invoke(app, ["fewshot", "--data", str(small_gsm8k), "--n", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory):
    """`family_model_dirs(family)`: the folder of a tiny random model of that family (tests/family_models.py),
    built once per session, sharing one tokenizer."""
    from family_models import build_family_model

    built: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("families")
    tok = build_tokenizer(base / "tokenizer", _corpus())

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family_model(base / family, tok, family)
        return built[family]

    return get

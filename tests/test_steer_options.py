"""`--steer` on the generating commands: it changes the outputs, goes into the manifest and the resume
fingerprint, reads a search's best.json, and is refused where it cannot apply."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import ConfigError
from gsmkit.evaluation.gsm8k import EvalSettings
from gsmkit.modeling import ModelSpec

runner = CliRunner()


@pytest.fixture(scope="module")
def caa(tiny_model_dir, small_gsm8k, tmp_path_factory):
    out = tmp_path_factory.mktemp("steer") / "caa"
    res = runner.invoke(app, ["steer", "vectors", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--limit", "4", "--method", "caa", "--layers", "all", "--no-cache",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _eval(model, data, out, *extra):
    return runner.invoke(app, ["eval", "gsm8k", "--model", str(model), "--data", str(data), "--limit", "3",
                               "--max-new-tokens", "12", "--out", str(out), "--json", *extra])


def _completions(out):
    return [json.loads(line)["completion"] for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_steered_eval_changes_outputs_records_the_setting_and_passes_the_zero_check(
        tiny_model_dir, small_gsm8k, caa, tmp_path):
    plain = _eval(tiny_model_dir, small_gsm8k, tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    steered = _eval(tiny_model_dir, small_gsm8k, tmp_path / "steered", "--steer", str(caa),
                    "--steer-layer", "0", "--steer-alpha", "40", "--check-zero")
    assert steered.exit_code == 0, steered.output
    assert _completions(tmp_path / "plain") != _completions(tmp_path / "steered")
    manifest = json.loads((tmp_path / "steered" / "manifest.json").read_text())
    assert manifest["resolved"]["steering"]["layers"] == [0]
    assert manifest["resolved"]["steering"]["alpha"] == 40.0
    assert "vectors.safetensors" in manifest["inputs"]["steer"]["files"]
    zero = _eval(tiny_model_dir, small_gsm8k, tmp_path / "zero", "--steer", str(caa), "--steer-alpha", "0")
    assert zero.exit_code == 0, zero.output
    assert _completions(tmp_path / "zero") == _completions(tmp_path / "plain")


def test_best_json_supplies_the_setting_and_explicit_flags_override_it(caa, tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"format": "gsmkit-steer-best", "version": 1, "steer": str(caa),
                                "steer_layer": "1", "steer_alpha": 2.5, "steer_positions": "all"}))
    given = EvalSettings(model=ModelSpec(model="m"), steer=best)
    assert given.steer == best and given.steer_alpha is None  # building the settings reads nothing
    s = given.resolved()
    assert (s.steer, s.steer_layer, s.steer_alpha, s.steer_positions) == (caa, "1", 2.5, "all")
    assert s.resolved() == s and s is not given  # a new object; resolving again changes nothing
    s = EvalSettings(model=ModelSpec(model="m"), steer=best, steer_alpha=-1.0).resolved()
    assert s.steer_alpha == -1.0 and s.steer_layer == "1"
    plain = EvalSettings(model=ModelSpec(model="m"), steer=caa).resolved()
    assert (plain.steer_alpha, plain.steer_positions, plain.steer_layer) == (1.0, "generated", None)
    best.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="field 'format' is not 'gsmkit-steer-best'"):
        EvalSettings(model=ModelSpec(model="m"), steer=best).resolved()


def test_a_changed_steering_setting_is_not_resumed_into_another_runs_folder(tiny_model_dir, small_gsm8k, caa):
    a = EvalSettings(model=ModelSpec(model=str(tiny_model_dir)), data=str(small_gsm8k), steer=caa,
                     steer_alpha=1.0)
    b = EvalSettings(model=ModelSpec(model=str(tiny_model_dir)), data=str(small_gsm8k), steer=caa,
                     steer_alpha=2.0)
    c = EvalSettings(model=ModelSpec(model=str(tiny_model_dir)), data=str(small_gsm8k), steer=caa,
                     steer_alpha=1.0, check_zero=True)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == c.fingerprint()  # the check changes no prediction
    assert "steer_vectors_sha256" in a.fingerprint()


@pytest.mark.parametrize("args, message", [
    (["--steer-alpha", "2"], "--steer-alpha needs --steer"),
    (["--check-zero"], "--check-zero needs --steer"),
])
@pytest.mark.usefixtures("no_loading")
def test_steer_flags_without_steer_are_refused(args, message, tiny_model_dir, small_gsm8k, tmp_path):
    res = _eval(tiny_model_dir, small_gsm8k, tmp_path / "o", *args)
    assert res.exit_code == 2 and message in res.output  # a misused option
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("no_loading")
def test_steering_where_it_cannot_apply_is_refused_before_loading(tiny_model_dir, tiny_qwen_dir, small_gsm8k,
                                                                   caa, tmp_path):
    res = _eval(tiny_model_dir, small_gsm8k, tmp_path / "v", "--steer", str(caa), "--backend", "vllm")
    assert res.exit_code == 1 and "--steer needs --backend hf" in res.output
    res = _eval(tiny_model_dir, small_gsm8k, tmp_path / "l", "--steer", str(caa), "--steer-layer", "7")
    assert res.exit_code == 1 and "--steer-layer" in res.output and "7" in res.output
    res = _eval(tiny_qwen_dir, small_gsm8k, tmp_path / "m", "--steer", str(caa))
    assert res.exit_code == 1 and "error:" in res.output
    assert not any((tmp_path / d).exists() for d in "vlm")


def test_generate_traces_takes_the_steering_too(tiny_model_dir, small_gsm8k, caa, tmp_path):
    out = tmp_path / "traces.jsonl"
    res = runner.invoke(app, ["generate-traces", "--model", str(tiny_model_dir), "--data", str(small_gsm8k),
                              "--split", "train", "--num-samples", "2", "--max-attempts", "1",
                              "--max-new-tokens", "8", "--steer", str(caa), "--steer-alpha", "3",
                              "--check-zero", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "traces.manifest.json").read_text())
    assert manifest["resolved"]["steering"]["alpha"] == 3.0

"""`report`, `compare` and `bench` on run files of the wrong shape: every file they read (metrics.json of eval
gsm8k, eval safety and eval ppl, manifest.json, trainer_log.jsonl, predictions.jsonl, items.jsonl, bench.json,
an adapter's training manifest) as not JSON, another JSON value than an object, a field of the wrong type, a
missing field and a torn last line. Each is one error line naming the file and the field, a hint, exit 1, no
traceback, and nothing written to --out. A torn last line of trainer_log.jsonl (a run stopped mid-write) is
read up to it, with a note; damage anywhere else in the log is an error naming the line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from study_fixtures import MODEL, eval_gsm8k_run, eval_safety_run, train_run
from typer.testing import CliRunner

from gsmkit.cli import app
from gsmkit.errors import DataError
from gsmkit.evaluation.perplexity import EvalPplSettings, PplGroup, PplMetrics
from gsmkit.manifest import build_manifest, to_jsonable
from gsmkit.modeling import ModelSpec
from gsmkit.run_folder import MANIFEST, RunOutput, json_writer, jsonl_writer
from gsmkit.studies.run_files import read_trainer_log

runner = CliRunner()
CORRECT = [True, False, True, True, False, True]


def _ppl_run(out: Path, losses: list[float], adapter: Path | None = None) -> Path:
    """An `eval ppl` folder written by gsmkit's writers, one row per loss (source gsm8k), 4 tokens each."""
    import math

    items = [{"index": i, "line": i + 1, "mode": "text", "source": "gsm8k", "tokens": 4, "loss": loss,
              "ppl": math.exp(loss), "windows": 1} for i, loss in enumerate(losses)]
    loss = sum(losses) / len(losses)
    group = PplGroup(n=len(losses), tokens=4 * len(losses), loss=loss, ppl=math.exp(loss))
    metrics = PplMetrics(n=len(losses), tokens=4 * len(losses), loss=loss, ppl=math.exp(loss),
                         groups={"source": {"gsm8k": group}}, max_length=64, stride=32, windows=len(losses),
                         items_over_window=0, scoring_s=1.0, tokens_per_s=1.0, wall_s=1.0)
    settings = EvalPplSettings(model=ModelSpec(model=MODEL, adapter=str(adapter) if adapter else None),
                               data=Path("bench.jsonl"), out=out)
    manifest = build_manifest("eval ppl", settings, inputs={})
    RunOutput.folder(out, finals=("items.jsonl", "metrics.json")).publish(
        {"items.jsonl": jsonl_writer(items),
         "metrics.json": json_writer(to_jsonable({**metrics.to_dict(), "manifest": manifest})),
         MANIFEST: json_writer(manifest)})
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One study, built once: `study/` (a training run t, its GSM8K, safety and ppl evaluations e, s, p),
    `pair/` (two GSM8K evaluations a, b and two ppl runs pa, pb) and `bench/` (probe, variant and a bench
    folder with a gate, b1)."""
    root = tmp_path_factory.mktemp("template")
    t = train_run(root / "study" / "t")
    eval_gsm8k_run(root / "study" / "e", CORRECT, adapter=t)
    eval_safety_run(root / "study" / "s", ["safe", "unsafe", "safe"], adapter=t)
    _ppl_run(root / "study" / "p", [1.0, 2.0], adapter=t)
    eval_gsm8k_run(root / "pair" / "a", CORRECT)
    eval_gsm8k_run(root / "pair" / "b", [not c for c in CORRECT])
    _ppl_run(root / "pair" / "pa", [1.0, 2.0])
    _ppl_run(root / "pair" / "pb", [1.0, 2.5])
    tp = train_run(root / "bench" / "tp", seed=7)
    tv = train_run(root / "bench" / "tv", seed=7, lora_r=4)
    eval_gsm8k_run(root / "bench" / "probe", CORRECT, adapter=tp)
    eval_gsm8k_run(root / "bench" / "variant", CORRECT, adapter=tv)
    res = runner.invoke(app, ["bench", "--probe", str(root / "bench" / "probe"), "--variant",
                              f"half={root / 'bench' / 'variant'}", "--gate", "gsm8k.strict>=0.1", "--n-boot",
                              "200", "--out", str(root / "bench" / "b1")])
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture
def study(tmp_path, template) -> Path:
    """A fresh copy of the template to damage, its manifests naming the copy's adapters."""
    copy = tmp_path / "runs"
    shutil.copytree(template, copy)
    for path in copy.rglob("*.json"):
        path.write_text(path.read_text().replace(str(template), str(copy)))
    return copy


# ---- damage ---------------------------------------------------------------------------------------------


def _json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))
    return damage


def _at(obj: dict, dotted: str) -> tuple[dict, str]:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj, last


def set_field(dotted: str, value) -> Callable[[Path], None]:
    def change(obj: dict) -> None:
        parent, key = _at(obj, dotted)
        parent[key] = value
    return _json(change)


def drop_field(dotted: str) -> Callable[[Path], None]:
    def change(obj: dict) -> None:
        parent, key = _at(obj, dotted)
        del parent[key]
    return _json(change)


def not_json(path: Path) -> None:
    path.write_text('{"n": 3, "accuracy')


def a_list(path: Path) -> None:
    path.write_text("[1, 2, 3]\n")


def _lines(path: Path, change: Callable[[list[str]], None]) -> None:
    lines = path.read_text().splitlines()
    change(lines)
    path.write_text("\n".join(lines) + "\n")


def line(n: int, text: str) -> Callable[[Path], None]:
    """Line n (1-based) replaced by `text`."""
    return lambda path: _lines(path, lambda lines: lines.__setitem__(n - 1, text))


def row(n: int, dotted: str, value=None, drop: bool = False) -> Callable[[Path], None]:
    """A field of the JSON object on line n set to `value` (or dropped)."""
    def change(lines: list[str]) -> None:
        obj = json.loads(lines[n - 1])
        parent, key = _at(obj, dotted)
        if drop:
            del parent[key]
        else:
            parent[key] = value
        lines[n - 1] = json.dumps(obj)
    return lambda path: _lines(path, change)


def torn(path: Path) -> None:
    """The last line cut in the middle, with no newline after it: a writer killed mid-write."""
    text = path.read_text().rstrip("\n")
    cut = text.rfind("\n") + 1
    path.write_text(text[:cut + (len(text) - cut) // 2])


def _refused(res, out: Path, path: Path, *needles: str) -> None:
    """Exit 1, one error line naming `path` and every needle, a hint, no traceback, nothing at `out`."""
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), res.output
    assert str(path) in lines[0], res.output
    for needle in needles:
        assert needle in lines[0], res.output
    assert not out.exists(), "a refused command must write nothing"


# ---- report ---------------------------------------------------------------------------------------------

GSM8K_METRICS = [
    ("not JSON", not_json, ["not readable JSON"]),
    ("a list", a_list, ["expected a JSON object, got a list"]),
    ("accuracy as text", set_field("accuracy_strict", "high"),
     ["field 'accuracy_strict' must be a number, got a string"]),
    ("a one-number interval", set_field("ci95_strict", [0.2]),
     ["field 'ci95_strict' must be a list of 2 numbers"]),
    ("an interval bound as text", set_field("ci95_flexible", [0.1, "x"]),
     ["field 'ci95_flexible[1]' must be a number"]),
    ("n as true", set_field("n", True), ["field 'n' must be an integer, got true"]),
    ("n as a fraction", set_field("n", 6.5), ["field 'n' must be an integer, got a number"]),
    ("a newer share as text", set_field("ended_in_reasoning", "none"),
     ["field 'ended_in_reasoning' must be"]),
    ("no flexible accuracy", drop_field("accuracy_flexible"), ["missing field 'accuracy_flexible'"]),
]
REPORT_CASES = [
    *[("study/e/metrics.json", *case) for case in GSM8K_METRICS],
    ("study/s/metrics.json", "not JSON", not_json, ["not readable JSON"]),
    ("study/s/metrics.json", "a list", a_list, ["got a list"]),
    ("study/s/metrics.json", "rate as text", set_field("safety_rate", "0.5"),
     ["field 'safety_rate' must be a number"]),
    ("study/s/metrics.json", "interval of text", set_field("ci95", ["a", "b"]),
     ["field 'ci95[0]' must be a number"]),
    ("study/s/metrics.json", "no total", drop_field("total"), ["missing field 'total'"]),
    ("study/p/metrics.json", "not JSON", not_json, ["not readable JSON"]),
    ("study/p/metrics.json", "a string", lambda p: p.write_text('"ppl"'), ["got a string"]),
    ("study/p/metrics.json", "ppl null", set_field("ppl", None), ["field 'ppl' must be a number, got null"]),
    ("study/p/metrics.json", "a group's ppl as text", set_field("groups.source.gsm8k.ppl", "x"),
     ["field 'groups.source.gsm8k.ppl' must be a number"]),
    ("study/p/metrics.json", "no tokens", drop_field("tokens"), ["missing field 'tokens'"]),
    ("study/t/manifest.json", "lora_r as text", set_field("settings.lora_r", "16"),
     ["field 'settings.lora_r' must be an integer or null, got a string"]),
    ("study/t/manifest.json", "settings a list", set_field("settings", [1]),
     ["field 'settings' must be an object"]),
    ("study/t/manifest.json", "steps a fraction", set_field("resolved.steps", 2.5),
     ["field 'resolved.steps'"]),
    ("study/t/manifest.json", "preset a number", set_field("settings.preset", 1),
     ["field 'settings.preset'"]),
    ("study/e/manifest.json", "adapter path a number", set_field("adapter.path", 3),
     ["field 'adapter.path'"]),
    ("study/e/manifest.json", "model adapter a list", set_field("settings.model.adapter", ["x"]),
     ["field 'settings.model.adapter' must be a string or null, got a list"]),
    ("study/e/manifest.json", "k as text", set_field("settings.k", "5"), ["field 'settings.k'"]),
    ("study/s/manifest.json", "created_at a number", set_field("created_at", 5), ["field 'created_at'"]),
    ("study/t/trainer_log.jsonl", "a middle line not JSON", line(2, '{"step": 2, "lo'),
     [":2: not valid JSON"]),
    ("study/t/trainer_log.jsonl", "a middle line a list", line(2, "[2, 1.5]"),
     [":2: expected a JSON object"]),
    ("study/t/trainer_log.jsonl", "a loss as text", row(1, "loss", "2.0"),
     [":1: field 'loss' must be a number"]),
    ("study/t/trainer_log.jsonl", "a row without its step", row(3, "step", drop=True),
     [":3: missing field 'step'"]),
    ("study/t/trainer_log.jsonl", "a whole last line damaged", line(4, '{"step": 3, "train_loss": }'),
     [":4: not valid JSON"]),
]


@pytest.mark.parametrize(("name", "what", "damage", "needles"), REPORT_CASES,
                         ids=[f"{c[0].split('/', 1)[1]}: {c[1]}" for c in REPORT_CASES])
def test_report_refuses_a_run_file_of_the_wrong_shape(study, tmp_path, name, what, damage, needles):  # noqa: ARG001
    damage(study / name)
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(study / "study"), "--out", str(out)])
    _refused(res, out, study / name, *needles)


def test_a_refused_report_leaves_the_last_report_as_it_was(study, tmp_path):
    out = tmp_path / "rep"
    assert runner.invoke(app, ["report", str(study / "study"), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    set_field("accuracy_strict", "high")(study / "study" / "e" / "metrics.json")
    res = runner.invoke(app, ["report", str(study / "study"), "--out", str(out)])
    assert res.exit_code == 1 and "accuracy_strict" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


def test_report_reads_a_trainer_log_up_to_its_torn_last_line(study, tmp_path):
    log = study / "study" / "t" / "trainer_log.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    log.write_text(log.read_text() + '{"step": 4, "epoch": 1.3, "lo')
    damaged = log.read_bytes()
    res = runner.invoke(app, ["report", str(study / "study"), "--out", str(tmp_path / "rep"), "--json"])
    assert res.exit_code == 0, res.output
    assert f"note: {log}: its last line (line {len(rows) + 1}) was cut off" in res.output
    (found,) = json.loads(res.stdout)["rows"]
    assert found["train_loss"] == rows[-1]["train_loss"]
    assert (tmp_path / "rep" / "loss_curves.png").is_file()
    assert log.read_bytes() == damaged  # a report never writes into the runs it reads


def test_report_tells_a_torn_line_from_a_damaged_one():
    """The trainer-log reader on its own: a torn last line is left out with a note; the same bytes with a
    newline after them (a line that was written whole) or before another line are an error naming it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "trainer_log.jsonl"
        whole = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
        log.write_text(whole + '{"step": 3, "lo')
        rows, note = read_trainer_log(log, {"step": int, "loss": float}, required=("step",))
        assert [r["step"] for r in rows] == [1, 2] and "line 3" in note
        log.write_text(whole + '{"step": 3, "loss": 1.2}')  # whole, only the newline missing: read
        rows, note = read_trainer_log(log, {"step": int, "loss": float})
        assert [r["step"] for r in rows] == [1, 2, 3] and note is None
        for text in (whole + '{"step": 3, "lo\n', '{"step": 1, "lo\n' + whole):
            log.write_text(text)
            with pytest.raises(DataError, match=r"trainer_log\.jsonl:[13]: not valid JSON"):
                read_trainer_log(log, {"step": int})


def test_report_skips_a_folder_whose_manifest_says_nothing_and_names_it_when_alone(study, tmp_path):
    """A manifest.json that is not a JSON object, or has no command, does not say what made the folder: among
    other runs it is listed as skipped with the file and what is wrong; named alone, that is the error."""
    for folder, damage, said in (("e", not_json, "manifest.json: not readable JSON"),
                                 ("s", a_list, "manifest.json: expected a JSON object, got a list"),
                                 ("p", drop_field("command"), "manifest.json: missing field 'command'")):
        damage(study / "study" / folder / MANIFEST)
        res = runner.invoke(app, ["report", str(study / "study"), "--out", str(tmp_path / "rep"), "--json"])
        assert res.exit_code == 0, res.output
        reasons = {Path(s["path"]).name: s["reason"] for s in json.loads(res.stdout)["skipped"]}
        assert said in reasons[folder]
        out = tmp_path / f"alone-{folder}"
        res = runner.invoke(app, ["report", str(study / "study" / folder), "--out", str(out)])
        assert res.exit_code == 1 and "no finished gsmkit runs" in res.output and said in res.output
        assert "Traceback" not in res.output and not out.exists()


def test_report_out_that_is_a_file_is_refused_before_any_run_is_read(study, tmp_path):
    out = tmp_path / "rep"
    out.write_text("mine")
    set_field("accuracy_strict", "high")(study / "study" / "e" / "metrics.json")  # would fail if read
    res = runner.invoke(app, ["report", str(study / "study"), "--out", str(out)])
    assert res.exit_code in (1, 2) and "accuracy_strict" not in res.output, res.output
    assert out.read_text() == "mine"


# ---- compare --------------------------------------------------------------------------------------------

N = len(CORRECT)
COMPARE_CASES = [
    ("pair/a/predictions.jsonl", "a line not JSON", line(2, '{"id": "gsm8k-0001", "prompt'),
     [":2: not valid JSON"]),
    ("pair/a/predictions.jsonl", "a line a list", line(3, '["gsm8k-0002"]'), [":3: expected a JSON object"]),
    ("pair/a/predictions.jsonl", "correctness as text", row(2, "correct_strict", "yes"),
     [":2: field 'correct_strict' must be bool"]),
    ("pair/a/predictions.jsonl", "no gold", row(1, "gold", drop=True), [":1: missing field 'gold'"]),
    ("pair/b/predictions.jsonl", "a torn last line", torn, [f":{N}: not valid JSON"]),
    ("pair/a/metrics.json", "not JSON", not_json, ["not readable JSON"]),
    ("pair/b/metrics.json", "a list", a_list, ["expected a JSON object, got a list"]),
    ("pair/a/metrics.json", "accuracy as text", set_field("accuracy_strict", "x"),
     ["field 'accuracy_strict'"]),
    ("pair/a/metrics.json", "style a number", set_field("style", 5),
     ["field 'style' must be a string, got a number"]),
    ("pair/b/metrics.json", "no n", drop_field("n"), ["missing field 'n'"]),
    ("pair/a/manifest.json", "not JSON", not_json, ["not readable JSON"]),
    ("pair/a/manifest.json", "a list", a_list, ["expected a JSON object, got a list"]),
    ("pair/a/manifest.json", "model a number", set_field("settings.model", 5),
     ["field 'settings.model' must be a string or an object, got a number"]),
    ("pair/b/manifest.json", "adapter sha256 a number", set_field("adapter", {"path": "x", "sha256": 5}),
     ["field 'adapter.sha256' must be a string or null"]),
    ("pair/a/manifest.json", "no command", drop_field("command"), ["missing field 'command'"]),
    ("pair/pa/metrics.json", "not JSON", not_json, ["not readable JSON"]),
    ("pair/pb/metrics.json", "a list", a_list, ["got a list"]),
    ("pair/pa/metrics.json", "ppl as text", set_field("ppl", "x"), ["field 'ppl' must be a number"]),
    ("pair/pa/metrics.json", "no ppl", drop_field("ppl"), ["missing field 'ppl'"]),
    ("pair/pb/metrics.json", "its manifest's model a number", set_field("manifest.settings.model", 3),
     ["field 'manifest.settings.model'"]),
    ("pair/pa/items.jsonl", "tokens as text", row(1, "tokens", "4"),
     [":1: field 'tokens' must be an integer"]),
    ("pair/pa/items.jsonl", "no loss", row(2, "loss", drop=True), [":2: missing field 'loss'"]),
    ("pair/pb/items.jsonl", "a torn last line", torn, [":2: not valid JSON"]),
]


@pytest.mark.parametrize(("name", "what", "damage", "needles"), COMPARE_CASES,
                         ids=[f"{c[0].split('/', 1)[1]}: {c[1]}" for c in COMPARE_CASES])
def test_compare_refuses_a_run_file_of_the_wrong_shape(study, tmp_path, name, what, damage, needles):  # noqa: ARG001
    damage(study / name)
    a, b = ("pa", "pb") if name.split("/")[1] in ("pa", "pb") else ("a", "b")
    out = tmp_path / "cmp.json"
    res = runner.invoke(app, ["compare", str(study / "pair" / a), str(study / "pair" / b), "--out", str(out)])
    _refused(res, out, study / name, *needles)


# ---- bench ----------------------------------------------------------------------------------------------

BENCH_RUN_CASES = [
    ("bench/probe/metrics.json", "accuracy as text", set_field("accuracy_strict", "x"),
     ["field 'accuracy_strict'"]),
    ("bench/probe/metrics.json", "a list", a_list, ["got a list"]),
    ("bench/variant/manifest.json", "model a number", set_field("settings.model", 1),
     ["field 'settings.model'"]),
    ("bench/probe/predictions.jsonl", "a torn last line", torn, [f":{N}: not valid JSON"]),
    ("bench/variant/predictions.jsonl", "a count as text", row(2, "num_tokens", "3"),
     [":2: field 'num_tokens'"]),
    ("bench/tv/manifest.json", "the adapter's seed as text", set_field("settings.seed", "7"),
     ["field 'settings.seed' must be an integer or null"]),
    ("bench/tp/manifest.json", "the adapter's manifest not JSON", not_json, ["not readable JSON"]),
]
BENCH_JSON_CASES = [
    ("not JSON", not_json, ["not readable JSON"]),
    ("a list", a_list, ["expected a JSON object, got a list"]),
    ("margin as text", set_field("margin", "0.025"), ["field 'margin' must be a number"]),
    ("version a fraction", set_field("version", 1.5), ["field 'version' must be an integer"]),
    ("gate passed as text", set_field("gate.passed", "yes"), ["field 'gate.passed' must be true or false"]),
    ("gate without its metric", drop_field("gate.metric"), ["missing field 'gate.metric'"]),
    ("gate a list", set_field("gate", []), ["field 'gate' must be an object or null"]),
    ("probe seed as text", set_field("probe.train_seed", "7"),
     ["field 'probe.train_seed' must be an integer or null"]),
    ("probe without its predictions", drop_field("probe.predictions"), ["missing field 'probe.predictions'"]),
    ("variants an object", set_field("variants", {}), ["field 'variants' must be a list"]),
    ("a variant's predictions a number", set_field("variants.0.evaluation.predictions", 5),
     ["field 'variants[0].evaluation.predictions' must be a string"]),
    ("a variant without its sha256", drop_field("variants.0.evaluation.predictions_sha256"),
     ["missing field 'variants[0].evaluation.predictions_sha256'"]),
    ("a variant without its evaluation", drop_field("variants.0.evaluation"),
     ["missing field 'variants[0].evaluation'"]),
    ("no probe", drop_field("probe"), ["missing field 'probe'"]),
]


@pytest.mark.parametrize(("name", "what", "damage", "needles"), BENCH_RUN_CASES,
                         ids=[f"{c[0].split('/', 1)[1]}: {c[1]}" for c in BENCH_RUN_CASES])
def test_bench_refuses_a_run_file_of_the_wrong_shape(study, tmp_path, name, what, damage, needles):  # noqa: ARG001
    damage(study / name)
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--probe", str(study / "bench" / "probe"), "--variant",
                              f"half={study / 'bench' / 'variant'}", "--gate", "gsm8k.strict>=0.1",
                              "--out", str(out)])
    _refused(res, out, study / name, *needles)


@pytest.mark.parametrize(("what", "damage", "needles"), BENCH_JSON_CASES,
                         ids=[c[0] for c in BENCH_JSON_CASES])
def test_bench_aggregate_refuses_a_bench_json_of_the_wrong_shape(study, tmp_path, what, damage, needles):  # noqa: ARG001
    bench_json = study / "bench" / "b1" / "bench.json"
    damage(bench_json)
    out = tmp_path / "agg"
    res = runner.invoke(app, ["bench", "--aggregate", str(study / "bench" / "b1"), "--out", str(out)])
    _refused(res, out, bench_json, *needles)


def test_the_undamaged_template_passes_every_command(study, tmp_path):
    """The cases above fail because of their damage: the same files undamaged give exit 0."""
    assert runner.invoke(app, ["report", str(study / "study"), "--out", str(tmp_path / "r")]).exit_code == 0
    for a, b in (("a", "b"), ("pa", "pb")):
        res = runner.invoke(app, ["compare", str(study / "pair" / a), str(study / "pair" / b)])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["bench", "--probe", str(study / "bench" / "probe"), "--variant",
                              f"half={study / 'bench' / 'variant'}", "--gate", "gsm8k.strict>=0.1",
                              "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["bench", "--aggregate", str(study / "bench" / "b1"),
                              "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output

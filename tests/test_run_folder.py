"""One set of output-folder rules (gsmkit.run_folder): refuse, resume, overwrite, publish atomically."""

from __future__ import annotations

import json

import pytest

from gsmkit.errors import ConfigError, ResumeError
from gsmkit.run_folder import (
    FINGERPRINT,
    MANIFEST,
    RunOutput,
    check_new_folder,
    json_writer,
    jsonl_writer,
    publish_folder,
    staging_folder,
)


def _folder(out, overwrite=False):
    return RunOutput.folder(out, finals=("rows.jsonl", "metrics.json"), journals=("rows.partial.jsonl",),
                            overwrite=overwrite, what="evaluation")


def _finish(output):
    output.publish({"rows.jsonl": jsonl_writer([{"id": "a"}]), "metrics.json": json_writer({"n": 1}),
                    MANIFEST: json_writer({"command": "test"})})


def test_a_fresh_run_creates_nothing_until_it_begins(tmp_path):
    out = tmp_path / "run"
    output = _folder(out)
    assert output.prepare({"k": 1}) is False
    assert not out.exists()
    output.begin({"k": 1})
    assert json.loads((out / FINGERPRINT).read_text()) == {"k": 1}


def test_partial_run_resumes_with_the_same_settings_and_refuses_others(tmp_path):
    out = tmp_path / "run"
    first = _folder(out)
    first.prepare({"k": 1})
    first.begin({"k": 1})
    first.journal("rows.partial.jsonl").append({"id": "a"})
    again = _folder(out)
    assert again.prepare({"k": 1}) is True
    assert [r["id"] for r in again.journal("rows.partial.jsonl").load()] == ["a"]
    with pytest.raises(ResumeError, match="different settings"):
        _folder(out).prepare({"k": 2})
    assert _folder(out, overwrite=True).prepare({"k": 2}) is False
    assert not any(out.iterdir())  # --overwrite cleared every file the run owns


def test_publish_writes_finals_then_drops_journal_and_fingerprint(tmp_path):
    out = tmp_path / "run"
    output = _folder(out)
    output.prepare({"k": 1})
    output.begin({"k": 1})
    output.journal("rows.partial.jsonl").append({"id": "a"})
    _finish(output)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "metrics.json", "rows.jsonl"]
    with pytest.raises(ConfigError, match="already complete"):
        _folder(out).prepare({"k": 1})


def test_an_interrupted_publish_is_resumed_not_taken_for_finished(tmp_path):
    out = tmp_path / "run"
    output = _folder(out)
    output.prepare({"k": 1})
    output.begin({"k": 1})

    def broken(fh):
        fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        output.publish({"rows.jsonl": jsonl_writer([{"id": "a"}]), "metrics.json": broken})
    assert not (out / "metrics.json").exists()  # never half-written
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert _folder(out).prepare({"k": 1}) is True  # the fingerprint is still there: the rerun resumes


def test_leftovers_without_a_fingerprint_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "rows.partial.jsonl").write_text("{}\n")
    with pytest.raises(ResumeError, match="settings are unknown"):
        _folder(out).prepare({"k": 1})


def test_file_layout_names_sidecars_after_the_stem(tmp_path):
    out = tmp_path / "traces.jsonl"
    output = RunOutput.file(out, sidecars=("stats.json",), journals=("partial.jsonl",), what="traces")
    assert output.path("partial.jsonl").name == "traces.partial.jsonl"
    assert output.path(FINGERPRINT).name == "traces.run.json"
    assert output.path(MANIFEST).name == "traces.manifest.json"
    out.mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        output.prepare({})


def test_whole_folders_are_swapped_in_complete_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError), staging_folder(out) as tmp:
        (tmp / "weights").write_text("partial")
        raise RuntimeError("save failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staging_folder(out) as tmp:
        (tmp / "weights").write_text("v1")
        publish_folder(tmp, out)
    with pytest.raises(ConfigError, match="already exists"):
        check_new_folder(out, overwrite=False)
    check_new_folder(out, overwrite=True)
    with staging_folder(out) as tmp:
        (tmp / "weights").write_text("v2")
        publish_folder(tmp, out)
    assert (out / "weights").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(ConfigError, match="would replace the input"):
        check_new_folder(tmp_path, overwrite=True, protected=(out,))


def test_a_run_stopped_before_its_first_row_does_not_block_other_settings(tmp_path):
    out = tmp_path / "run"
    first = _folder(out)
    first.prepare({"k": 1})
    first.begin({"k": 1})  # then stopped before any row was journalled
    assert _folder(out).prepare({"k": 2}) is False
    assert not (out / FINGERPRINT).exists()


def test_a_folder_output_never_replaces_an_input_or_the_current_folder(tmp_path, monkeypatch):
    from gsmkit.run_folder import check_not_an_input

    data = tmp_path / "runs" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    with pytest.raises(ConfigError, match="would replace the input"):
        check_not_an_input(tmp_path / "runs", (data, None, "openai/gsm8k"))
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(ConfigError, match="current folder"):
        check_not_an_input(tmp_path)
    check_not_an_input(tmp_path / "elsewhere", (data,))

"""gsmkit.jsonl: validated reading (path:line: reason) and atomic / resumable writing."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from gsmkit.errors import DataError
from gsmkit.jsonl import Journal, atomic_open, dumps_line, iter_jsonl, read_jsonl, write_json, write_jsonl


def _write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def _leftovers(folder):
    """Every name in `folder` (temp files of atomic writes are hidden siblings)."""
    return sorted(p.name for p in folder.iterdir())


# --- reading ---------------------------------------------------------------------------------------


def test_read_round_trip_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"a": 1}\n\n   \n{"b": "x"}\n')
    assert read_jsonl(path) == [{"a": 1}, {"b": "x"}]
    assert [n for n, _ in iter_jsonl(path)] == [1, 4]


def test_read_passes_path_and_line_to_parse(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    seen = read_jsonl(path, lambda obj, where: (obj["a"], where))
    assert seen == [(1, f"{path}:1"), (2, f"{path}:3")]


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ('{"a": 1}\n{"a": 2\n', 2, "not valid JSON"),
        ('{"a": 1}\n\n[1, 2]\n', 3, "expected a JSON object, got list"),
        ('"text"\n', 1, "expected a JSON object, got str"),
        ("{\"a\": 1}\n{'a': 1}\n", 2, "not valid JSON"),
    ],
)
def test_bad_line_names_path_and_line(tmp_path, content, line, reason):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert reason in str(info.value)
    assert info.value.hint


def test_iter_raises_only_when_reaching_the_bad_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"a": 1}\nnope\n')
    it = iter_jsonl(path)
    assert next(it) == (1, {"a": 1})
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: not valid JSON")):
        next(it)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: file not found")):
        read_jsonl(path)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: file not found")):
        list(iter_jsonl(path))


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}: is a folder")):
        read_jsonl(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = _write(tmp_path / "empty.jsonl", content)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: file is empty")):
        read_jsonl(path)
    assert read_jsonl(path, allow_empty=True) == []


def test_invalid_utf8_names_the_line(tmp_path):
    path = _write(tmp_path / "latin1.jsonl", b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: not valid UTF-8")):
        read_jsonl(path)


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = _write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_unicode_line_separator_inside_a_string_stays_one_row(tmp_path):
    row = {"q": "one\u2028two\x85three"}
    path = _write(tmp_path / "u.jsonl", dumps_line(row) + dumps_line({"q": "next"}))
    assert list(iter_jsonl(path)) == [(1, row), (2, {"q": "next"})]


# --- atomic writing ---------------------------------------------------------------------------------


def _rows_then_fail(n_good: int):
    for i in range(n_good):
        yield {"i": i}
    raise RuntimeError("writer died")


def test_write_jsonl_round_trip(tmp_path):
    rows = [{"id": "a", "text": "café ✓"}, {"id": "b", "n": [1, 2]}]
    path = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(path, rows) == 2
    assert read_jsonl(path) == rows
    assert "café ✓" in path.read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert _leftovers(path.parent) == ["out.jsonl"]


def test_failed_write_leaves_no_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="writer died"):
        write_jsonl(path, _rows_then_fail(1000))
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"old": True}])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_jsonl(path, _rows_then_fail(3))
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == ["out.jsonl"]


def test_successful_write_replaces_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"old": True}, {"old": True}])
    write_jsonl(path, [{"new": 1}])
    assert read_jsonl(path) == [{"new": 1}]
    assert _leftovers(tmp_path) == ["out.jsonl"]


def test_atomic_open_target_untouched_until_exit(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_open(path) as fh:
        fh.write("new")
        fh.flush()
        assert path.read_text() == "old"  # readers never see a half-written file
    assert path.read_text() == "new"


def test_atomic_open_keyboard_interrupt_cleans_up(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt), atomic_open(path, "wb") as fh:
        fh.write(b"partial")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []


def test_atomic_write_respects_umask(tmp_path):
    """The renamed file gets ordinary permissions (0666 minus umask), not a temp file's 0600."""
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == 0o644


def test_write_json_is_pretty_and_atomic(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": [1], "a": "é"})
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"b": [1], "a": "é"}
    assert text.endswith("}\n") and "\n  " in text
    assert _leftovers(tmp_path) == ["m.json"]


def test_dumps_line_is_one_line():
    line = dumps_line({"text": "a\nb", "x": 1})
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {"text": "a\nb", "x": 1}


# --- journal ----------------------------------------------------------------------------------------


def test_journal_missing_file_loads_empty(tmp_path):
    assert Journal(tmp_path / "p.partial.jsonl").load() == []


def test_journal_append_load_round_trip(tmp_path):
    path = tmp_path / "deep" / "p.partial.jsonl"
    j = Journal(path)
    rows = [{"id": str(i), "text": "x\ny"} for i in range(5)]
    for r in rows:
        j.append(r)
    j.close()
    assert Journal(path).load() == rows
    assert path.read_text(encoding="utf-8").count("\n") == 5


def test_journal_rows_are_on_disk_before_close(tmp_path):
    path = tmp_path / "p.partial.jsonl"
    j = Journal(path)
    j.append({"id": "a"})
    assert Journal(path).load() == [{"id": "a"}]
    j.close()


def test_journal_drops_torn_last_line_and_truncates(tmp_path):
    path = tmp_path / "p.partial.jsonl"
    good = dumps_line({"id": "a"}) + dumps_line({"id": "b"})
    path.write_text(good + '{"id": "c", "compl', encoding="utf-8")
    j = Journal(path)
    assert j.load() == [{"id": "a"}, {"id": "b"}]
    assert path.read_text(encoding="utf-8") == good
    # A rerun appends after the last good row, and the file is valid JSONL again.
    j.append({"id": "c"})
    j.close()
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_journal_drops_complete_json_without_newline(tmp_path):
    """A line whose newline never reached the disk is torn even if its JSON happens to parse."""
    path = tmp_path / "p.partial.jsonl"
    good = dumps_line({"id": "a"})
    path.write_text(good + '{"id": "b"}', encoding="utf-8")
    assert Journal(path).load() == [{"id": "a"}]
    assert path.read_text(encoding="utf-8") == good


@pytest.mark.parametrize("damage", [b"\x00\x00\x00", b'{"id": "x"\n', b"[1, 2]\n", b"\xff\xfe\n"])
def test_journal_cuts_at_first_damaged_line(tmp_path, damage):
    path = tmp_path / "p.partial.jsonl"
    good = dumps_line({"id": "a"}).encode()
    path.write_bytes(good + damage)
    assert Journal(path).load() == [{"id": "a"}]
    assert path.read_bytes() == good


def test_journal_intact_file_is_not_rewritten(tmp_path):
    path = tmp_path / "p.partial.jsonl"
    path.write_text(dumps_line({"id": "a"}), encoding="utf-8")
    before = path.stat().st_mtime_ns, path.read_bytes()
    assert Journal(path).load() == [{"id": "a"}]
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_journal_remove(tmp_path):
    path = tmp_path / "p.partial.jsonl"
    j = Journal(path)
    j.append({"id": "a"})
    j.remove()
    assert not path.exists()
    j.remove()  # idempotent

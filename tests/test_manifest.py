"""gsmkit.manifest: what produced an artifact (argv, versions, input digests, settings), as plain JSON."""

from __future__ import annotations

import enum
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import gsmkit
from gsmkit import manifest as manifest_mod
from gsmkit.manifest import build_manifest, git_commit, package_versions, sha256_file, to_jsonable
from gsmkit.prompts import PROMPT_VERSION
from gsmkit.records import SCHEMA_VERSION


class Color(enum.Enum):
    RED = "red"


@dataclass
class Inner:
    rate: float = 1e-4
    tags: tuple[str, ...] = ("a", "b")


@dataclass
class Settings:
    model: str = "tiny"
    out: Path = Path("runs/x")
    k: int = 8
    limit: int | None = None
    sample: bool = False
    inner: Inner = field(default_factory=Inner)
    color: Color = Color.RED


ARGV = ["gsmkit", "eval", "gsm8k", "--model", "tiny", "--k", "8"]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "test.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n' * 100)
    return path


@pytest.fixture
def manifest(monkeypatch, data_file):
    monkeypatch.setattr(sys, "argv", list(ARGV))
    return build_manifest("eval gsm8k", Settings(),
                          inputs={"data": data_file, "hub": "openai/gsm8k", "none": None},
                          seeds={"seed": 3}, extra={"resolved": {"style": "plain"}})


def test_records_command_and_argv(manifest):
    assert manifest["command"] == "eval gsm8k"
    assert manifest["argv"] == ARGV


def test_records_versions(manifest):
    assert manifest["gsmkit_version"] == gsmkit.__version__
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["prompt_version"] == PROMPT_VERSION
    assert manifest["python"] == sys.version.split()[0]
    assert manifest["packages"]["torch"] == importlib.metadata.version("torch")
    assert manifest["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert manifest["manifest_version"] == manifest_mod.MANIFEST_VERSION
    assert manifest["created_at"].endswith("+00:00")


def test_records_input_sha256(manifest, data_file):
    expected = hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert manifest["inputs"]["data"] == {"path": str(data_file), "sha256": expected}
    assert manifest["inputs"]["hub"] == {"path": "openai/gsm8k", "sha256": None}
    assert manifest["inputs"]["none"] is None


def test_records_settings_seeds_and_extra(manifest):
    assert manifest["settings"] == {
        "model": "tiny", "out": "runs/x", "k": 8, "limit": None, "sample": False,
        "inner": {"rate": 1e-4, "tags": ["a", "b"]}, "color": "Color.RED",
    }
    assert manifest["seeds"] == {"seed": 3}
    assert manifest["resolved"] == {"style": "plain"}
    assert "platform" in manifest["device"]


def test_is_json_serialisable(manifest):
    text = json.dumps(manifest, allow_nan=False)
    assert json.loads(text)["settings"]["inner"]["rate"] == 1e-4


def test_git_commit_is_the_checkouts_head_or_none_outside_one(manifest):
    """In a git checkout of gsmkit the manifest names its HEAD (asked of git here, not of gsmkit); run from
    anything else (an installed wheel, a copied tree) it is None."""
    source = Path(gsmkit.__file__).resolve().parent.parent
    if (source / ".git").exists():
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        assert manifest["git_commit"] == head and len(head) == 40
    else:
        assert manifest["git_commit"] is None


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 1000
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_folder_input_hashes_every_file(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    m = build_manifest("x", {}, inputs={"model": folder})
    assert m["inputs"]["model"] == {
        "path": str(folder),
        "files": {"config.json": hashlib.sha256(b"{}").hexdigest(),
                  str(Path("sub") / "w.bin"): hashlib.sha256(b"\x00" * 10).hexdigest()},
    }


def test_folder_input_lists_files_it_did_not_hash(monkeypatch, tmp_path):
    monkeypatch.setattr(manifest_mod, "_MAX_DIR_FILES", 2)
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(name)
    digest = build_manifest("x", {}, inputs={"d": tmp_path})["inputs"]["d"]
    assert sorted(digest["files"]) == ["a.txt", "b.txt"]
    assert digest["not_hashed"] == ["c.txt"]


def test_to_jsonable_is_deterministic_and_strict():
    assert to_jsonable({"s": {"b", "c", "a"}, 1: (Path("p"), None)}) == {"s": ["a", "b", "c"],
                                                                         "1": ["p", None]}
    out = to_jsonable({"x": float("inf"), "y": float("nan"), "z": 0.5})
    assert out == {"x": "inf", "y": "nan", "z": 0.5}
    json.dumps(out, allow_nan=False)


def test_dict_settings_are_accepted():
    m = build_manifest("fewshot", {"data": "openai/gsm8k", "n": 8, "out": Path("pool.jsonl")})
    assert m["settings"] == {"data": "openai/gsm8k", "n": 8, "out": "pool.jsonl"}
    assert m["inputs"] == {} and m["seeds"] == {}


def test_package_versions_lists_missing_packages_as_none(monkeypatch):
    monkeypatch.setattr(manifest_mod, "_PACKAGES", ("torch", "surely-not-installed-pkg"))
    assert package_versions() == {"torch": importlib.metadata.version("torch"),
                                  "surely-not-installed-pkg": None}


def test_git_commit_only_returns_real_commits(monkeypatch):
    if not (Path(manifest_mod.__file__).resolve().parent.parent / ".git").exists():
        pytest.skip("gsmkit does not run from a git checkout here")
    answers = iter([
        subprocess.CompletedProcess([], 128, "HEAD\n", "fatal: ambiguous argument 'HEAD'"),  # no commits yet
        subprocess.CompletedProcess([], 0, "a" * 40 + "\n", ""),
    ])
    monkeypatch.setattr(subprocess, "run", lambda *_, **__: next(answers))
    assert git_commit() is None
    assert git_commit() == "a" * 40

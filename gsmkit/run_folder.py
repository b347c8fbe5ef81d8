"""The output of a command, as one set of rules: prepare, refuse / resume / overwrite, fingerprint, journal,
manifest, and one atomic publish. Every command that writes an output folder or file goes through here.

In: where the output goes and which files it owns. Out: a `RunOutput` that
- `prepare(fingerprint)`: refuses an output that exists and is finished (unless `overwrite`), resumes a
  partial one made with the same settings (its `run.json` fingerprint matches), refuses one made with
  other settings (`ResumeError`), clears everything it owns with `overwrite`; it never creates anything;
- `begin()`: creates the folder and records the fingerprint, once the inputs and the model are ready;
- `journal(name)`: an append-only `Journal` of finished rows inside the output, for resumable runs (one
  per process in a launch of several: `journal_rows` reads them all);
- `publish({name: writer})`: writes each final file under a temporary name in the same folder and renames
  it into place, then removes the journals and the fingerprint last, so an interrupted publish is
  resumed, never mistaken for a finished run.
Whole folders (a merged model, an adapter) are built in a hidden sibling (`staging_folder`) and renamed
into place by `publish_folder`: a failed run leaves nothing at `out`.

Layouts: a folder output owns files inside `out` (`RunOutput.folder`); a file output (generate-traces)
owns `out` and sidecars named after its stem (`traces.stats.json`, `traces.partial.jsonl`, ...;
`RunOutput.file`), or after its whole name with `keep_suffix` (fewshot, convert-benchmarks:
`pool.jsonl.manifest.json`).

One rule for output paths (`check_output`), checked when a `RunOutput` is made and again by `prepare`, by
`check_new_folder` and `check_not_an_input` for whole folders, so before any model loads; it creates
nothing. An output path must be writable: every existing parent a folder, nothing of the wrong kind at
the path itself, and the folder its files are created in (or the nearest existing parent the missing
ones are made from) one this user may write in. And it must not be one of the run's own inputs: the output,
and every file it owns, is none of them; a folder replaced whole also neither holds an input nor lies
inside one (`merge --out ADAPTER/merged` is refused; `eval gsm8k --out ADAPTER/eval` and audit-svd's
default `ADAPTER/audit` only add their own files beside the adapter's). A failure is an `OutputPathError`
(a `ConfigError`, exit 1): one line naming the path, with a hint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsmkit.errors import ConfigError, ResumeError
from gsmkit.jsonl import Journal, atomic_open, dumps_line

FINGERPRINT = "run.json"
MANIFEST = "manifest.json"
RESUME_HINT = "rerun with the same options to resume, or pass --overwrite to start again"


class OutputPathError(ConfigError):
    """An output path that cannot be written: a parent that cannot be made or written in, something of
    the wrong kind in the way, or one of the run's own inputs."""


@dataclass
class RunOutput:
    """The files one run owns. `finals`: written at the end (their presence without a fingerprint means
    the run finished); `journals`: partial rows while it runs; `extra`: other files it owns (removed by
    --overwrite)."""

    out: Path  # what the user named with --out (a folder, or the main file)
    root: Path  # the folder the files are in
    names: dict[str, str]  # role -> file name in root
    finals: tuple[str, ...]
    journals: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    overwrite: bool = False
    what: str = "run"  # "evaluation", "traces", ...: for messages
    inputs: tuple[Any, ...] = ()  # the run's own inputs (paths; Hub ids, None skipped): never written over

    @classmethod
    def folder(cls, out: Path, finals: tuple[str, ...], journals: tuple[str, ...] = (),
               extra: tuple[str, ...] = (), overwrite: bool = False, what: str = "run",
               inputs: Iterable[Any] = ()) -> RunOutput:
        """The files of a folder output; checked at once (`check`), so a bad --out fails before anything
        loads."""
        out = Path(out).expanduser()
        names = {n: n for n in (*finals, *journals, *extra, FINGERPRINT, MANIFEST)}
        output = cls(out, out, names, finals, journals, extra, overwrite, what, tuple(inputs))
        output.check()
        return output

    @classmethod
    def file(cls, out: Path, sidecars: tuple[str, ...], journals: tuple[str, ...] = (),
             overwrite: bool = False, what: str = "run", keep_suffix: bool = False,
             inputs: Iterable[Any] = ()) -> RunOutput:
        """`out` itself is the main final file; `sidecars` ("stats.json") are named `<stem>.<sidecar>`, or
        `<name>.<sidecar>` with `keep_suffix` (`pool.jsonl.manifest.json`, as the files already published
        by fewshot and convert-benchmarks are named). Checked at once, as `folder` is."""
        out = Path(out).expanduser()
        stem = out.name if keep_suffix else out.stem
        names = {"main": out.name, **{s: f"{stem}.{s}" for s in (*sidecars, *journals)},
                 FINGERPRINT: f"{stem}.{FINGERPRINT}", MANIFEST: f"{stem}.{MANIFEST}"}
        output = cls(out, out.parent, names, ("main", *sidecars), journals, (), overwrite, what,
                     tuple(inputs))
        output.check()
        return output

    def path(self, role: str) -> Path:
        return self.root / self.names[role]

    def _owned(self) -> list[Path]:
        return [self.path(r) for r in self.names] + [p for r in self.journals for p in self._siblings(r)]

    def _siblings(self, role: str) -> list[Path]:
        """The per-process journals of `role` (`<stem>.p<i><suffix>`) that a launch of several wrote."""
        p = self.path(role)
        return sorted(p.parent.glob(f"{p.stem}.p*{p.suffix}"))

    def check(self) -> None:
        """The output path rule (`check_output`) for this output and every file it owns."""
        check_output(self.out, folder=self.root == self.out, inputs=self.inputs,
                     owned=[self.path(r) for r in self.names], what=self.what)


    def prepare(self, fingerprint: Any) -> bool:
        """Decide what to do with what is there; True when a partial run with these settings resumes."""
        self.check()
        if self.overwrite:
            self.clear()
            return False
        fp = self.path(FINGERPRINT)
        if not fp.exists():
            finished = [self.path(r) for r in self.finals if self.path(r).exists()]
            if finished:
                raise ConfigError(f"{finished[0]}: this {self.what} is already complete",
                                  hint="pass --overwrite to run it again, or choose another --out")
            leftovers = [p for p in self._owned() if p.exists()]
            if leftovers:
                raise ResumeError(
                    f"{self.out}: holds {leftovers[0].name} from a run whose settings are unknown "
                    f"(no {fp.name})",
                    hint="pass --overwrite to start again, or choose another --out")
            return False
        try:
            recorded = json.loads(fp.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != json.loads(json.dumps(fingerprint)):
            if not any(self.journal_rows(role) for role in self.journals) and self.journals:
                self.clear()  # it began but journalled nothing (stopped before its first row): start afresh
                return False
            raise ResumeError(f"{self.out}: holds a partial run made with different settings",
                              hint=RESUME_HINT)
        return True

    def clear(self) -> None:
        for p in self._owned():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def begin(self, fingerprint: Any) -> None:
        """The run starts: the folder exists and holds the fingerprint a resumed run must match."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.path(FINGERPRINT), json.dumps(fingerprint, indent=2, ensure_ascii=False) + "\n")

    def journal(self, role: str, process: int = 0, processes: int = 1) -> Journal:
        """The journal of `role` that process `process` of `processes` appends to: the plain one alone,
        `<stem>.p<process><suffix>` in a launch of several."""
        p = self.path(role)
        return Journal(p if processes == 1 else p.with_name(f"{p.stem}.p{process}{p.suffix}"))

    def journal_rows(self, role: str) -> list[dict[str, Any]]:
        """Every row journalled under `role`, by one process or several (a run may resume under another
        number of processes than it began with)."""
        return [row for p in (self.path(role), *self._siblings(role)) for row in Journal(p).load()]

    def publish(self, writers: dict[str, Callable[[Any], None]]) -> None:
        """Write each final file atomically, then drop the journals and, last, the fingerprint."""
        self.root.mkdir(parents=True, exist_ok=True)
        for role, write in writers.items():
            with atomic_open(self.path(role)) as fh:
                write(fh)
        for role in self.journals:
            for p in (self.path(role), *self._siblings(role)):
                Journal(p).remove()
        self.path(FINGERPRINT).unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def save_figure(fig: Any, png: Path) -> None:
    """A matplotlib figure written as `png` atomically (temporary name, then rename), then closed."""
    import matplotlib.pyplot as plt

    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def json_writer(obj: Any) -> Callable[[Any], None]:
    """A `publish` writer of pretty JSON."""

    def write(fh: Any) -> None:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")

    return write


def jsonl_writer(rows: Any) -> Callable[[Any], None]:
    """A `publish` writer of JSON Lines."""

    def write(fh: Any) -> None:
        for row in rows:
            fh.write(dumps_line(row))

    return write


# ---- whole folders --------------------------------------------------------------------------------------


def check_new_folder(out: Path, overwrite: bool, protected: Iterable[Any] = (),
                     option: str = "--out") -> None:
    """A folder output that is replaced whole: the output path rule (`check_output`, whole), and an existing
    folder refused unless --overwrite."""
    out = Path(out).expanduser()
    check_output(out, folder=True, inputs=protected, whole=True, option=option)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: already exists",
                          hint=f"pass --overwrite to replace it, or choose another {option}")


def check_not_an_input(out: Path, protected: Iterable[Any] = ()) -> None:
    """An output that replaces `out` whole (a training run's folder; compare's file): the output path rule
    (`check_output`, whole), whatever `out` is (its own kind is its command's to check)."""
    check_output(out, folder=None, inputs=protected, whole=True)


def check_output(out: Path, *, folder: bool | None, inputs: Iterable[Any] = (), whole: bool = False,
                 owned: Iterable[Path] = (), option: str = "--out", what: str = "run") -> None:
    """The one rule for an output path (see the module docstring); creates nothing.

    `folder`: True for a folder output, False for a file, None to leave the path's own kind alone.
    `inputs`: the run's own inputs (paths; Hub ids, missing paths and None are skipped). `whole`: the
    output replaces `out` whole (built in a hidden sibling and swapped in), so it must also neither hold an
    input, nor the current folder, nor lie inside an input folder. `owned`: the files the run writes."""
    out = Path(out).expanduser()
    where = out.absolute()
    if os.path.lexists(where):
        if folder is True and not where.is_dir():
            raise OutputPathError(f"{out}: exists and is not a folder", hint=f"{option} names a folder")
        if folder is False and where.is_dir():
            raise OutputPathError(f"{out}: is a folder", hint=f"{option} names the {what} file")
    # files are made in `out` itself (a folder output that owns files in it), else beside it
    home = where if folder is True and not whole else where.parent
    nearest = home
    while not os.path.lexists(nearest):
        nearest = nearest.parent
    if not nearest.is_dir():
        raise OutputPathError(f"{out}: {nearest} is a file, not a folder",
                              hint=f"choose another {option}, or move that file away")
    for folder_used in (nearest, where) if whole and where.is_dir() else (nearest,):
        if not os.access(folder_used, os.W_OK | os.X_OK):
            raise OutputPathError(f"{out}: cannot write in {folder_used} (no write permission)",
                                  hint=f"choose another {option}, or make {folder_used} writable")
    _check_inputs(out, where.resolve(), inputs, whole, owned, option)


def _check_inputs(out: Path, resolved: Path, inputs: Iterable[Any], whole: bool, owned: Iterable[Path],
                  option: str) -> None:
    hint = f"choose another {option}, away from the files and folders the run reads"
    if whole:
        here = Path.cwd().resolve()
        if resolved == here or resolved in here.parents:
            raise OutputPathError(f"{out}: {option} would replace the current folder", hint=hint)
    files = {Path(p).expanduser().resolve() for p in owned}
    for p in inputs:
        if p is None or not Path(p).expanduser().exists():
            continue
        p = Path(p).expanduser().resolve()
        if p == resolved or p in files or (whole and resolved in p.parents):
            raise OutputPathError(f"{out}: {option} would replace the input {p}", hint=hint)
        if whole and p in resolved.parents:
            raise OutputPathError(f"{out}: {option} lies inside the input {p}", hint=hint)


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A hidden, empty sibling of `out` to build a folder in; removed if the block fails."""
    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_folder(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` folder to `out`; an old `out` is swapped out first and removed after, so
    `out` is always either the old folder or the complete new one."""
    out = out.expanduser()
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = out.parent / f".{out.name}.old-{secrets.token_hex(6)}"
    os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)

"""The `gsmkit` executable: a root Typer app, its command groups, and the one error boundary.

Heavy libraries (torch, transformers) are imported inside commands, so `gsmkit --help` is fast.
`GsmkitError`s become one line on stderr plus a hint, exit code 1 (2 for a misused option); so does an
`OSError` on a path that no check caught first (a permission, a file in the way, a full disk: `os_error`);
`--debug` shows the traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from gsmkit import __version__

if TYPE_CHECKING:
    from gsmkit.errors import GsmkitError


class _ErrorBoundaryGroup(TyperGroup):
    """Catches library errors once for every command, so none of them prints a traceback."""

    def invoke(self, ctx: typer.Context):
        from gsmkit.errors import GsmkitError

        try:
            return super().invoke(ctx)
        except (GsmkitError, OSError) as caught:
            err = os_error(caught) if isinstance(caught, OSError) else caught
            if err is None or (ctx.obj or {}).get("debug"):
                raise
            from rich.text import Text

            console = _err_console()
            # Text objects, not markup: messages quote user input and hints like 'gsmkit[vllm]'.
            console.print(Text.assemble(("error: ", "bold red"), err.message), highlight=False,
                          soft_wrap=True)
            if err.hint:
                console.print(Text.assemble(("hint: ", "yellow"), err.hint), highlight=False, soft_wrap=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            _err_console().print("interrupted: rerun the same command to resume", highlight=False)
            ctx.exit(130)


# What the user can do about an OSError on a path, by its errno.
_OS_HINTS = {
    errno.EACCES: "check the permissions on that path, or choose another path (--out)",
    errno.EPERM: "check the permissions on that path, or choose another path (--out)",
    errno.EROFS: "that file system is read-only: choose another path (--out)",
    errno.EEXIST: "something is already there: move it away, or choose another path (--out)",
    errno.ENOTDIR: "a part of that path is a file, not a folder: move it away, or choose another path",
    errno.EISDIR: "that path is a folder where a file must go: choose another path",
    errno.ENOTEMPTY: "that folder is not empty: move it away, or choose another path",
    errno.ENOSPC: "free some disk space (or choose another --out), then rerun the same command to resume",
    errno.EDQUOT: "free some of your disk quota, then rerun the same command to resume",
    errno.ENOENT: "check that the path exists",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "that path is a loop of symbolic links: choose another path",
    errno.EXDEV: "keep the output on the same file system as its folder",
}


def os_error(err: OSError) -> GsmkitError | None:
    """An OSError on a path as a GsmkitError (one line naming the path, a hint), or None for one that is
    not about a path (a network error; a closed pipe, which click handles): those keep their traceback."""
    from gsmkit.errors import GsmkitError

    if err.errno == errno.EPIPE or (err.filename is None and err.errno not in _OS_HINTS):
        return None
    reason = err.strerror or str(err)
    where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
    message = f"{where}: {reason}" if err.filename is not None else reason
    return GsmkitError(message, hint=_OS_HINTS.get(err.errno, "rerun with --debug to see where it happened"))


def _err_console():
    from rich.console import Console

    return Console(stderr=True)


app = typer.Typer(
    cls=_ErrorBoundaryGroup,
    name="gsmkit",
    help="Fine-tune and evaluate causal language models on GSM8K grade-school math.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gsmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,  # noqa: ARG001
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    """gsmkit: independent subcommands that pass JSONL files and adapter folders to each other."""
    ctx.obj = {"debug": debug}
    if not debug:  # what a user sees is gsmkit's own; --debug shows the libraries' output too
        from gsmkit.console_noise import silence_library_noise

        silence_library_noise()


from gsmkit.cli import audit as _audit
from gsmkit.cli import bench as _bench
from gsmkit.cli import compare as _compare
from gsmkit.cli import convert as _convert
from gsmkit.cli import eval as _eval
from gsmkit.cli import fewshot as _fewshot
from gsmkit.cli import merge as _merge
from gsmkit.cli import report as _report
from gsmkit.cli import steer as _steer
from gsmkit.cli import traces as _traces
from gsmkit.cli import train as _train

# in pipeline order (Typer lists single commands before command groups)
app.command("fewshot")(_fewshot.fewshot)
app.command("convert-benchmarks")(_convert.convert_benchmarks)
app.command("generate-traces")(_traces.generate_traces)
app.add_typer(_train.app, name="train")
app.add_typer(_eval.app, name="eval")
app.command("merge")(_merge.merge)
app.command("audit-svd")(_audit.audit_svd)
app.add_typer(_steer.app, name="steer")
app.command("report")(_report.report)
app.command("compare")(_compare.compare)
app.command("bench")(_bench.bench)


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())

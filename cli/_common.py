"""What every command shares: the console, progress bars, the JSON writer, the options, and the one
place that turns exceptions into exit codes (docs/interface.md).

Option defaults are read from the library's settings classes (:mod:`ddscore_jax.settings`,
:class:`ddscore_jax.finetuning.Settings`, :class:`ddscore_jax.evaluation.Settings`), never typed
here, and their ``check`` is the one validation of the values; choices are ``Literal`` types, so
``--help`` lists them and Click refuses others with exit 2.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from ddscore_jax import interrupts
from ddscore_jax.atomic import write_json_atomic
from ddscore_jax.errors import InputError, environment_message, os_error_in_text
from ddscore_jax.metrics import METRICS
from ddscore_jax.progress import Bars  # noqa: F401  (the library's bars; commands use them)
from ddscore_jax.settings import Dtype, Engine

# Typer 0.2x carries its own copy of Click: its usage errors are these classes, not click's.
_clickx = typer.core._click.exceptions

console = Console(stderr=True)

ZooArg = Annotated[Path, typer.Argument(help="Model zoo folder (made by `convert`).")]
DataArg = Annotated[Path, typer.Argument(
    help="Data set: a folder of class sub-folders, or one with train/ and valid/ inside.")]
JsonOpt = Annotated[str | None, typer.Option(
    "--json", metavar="PATH|-", help="Also write machine-readable results ('-' for stdout).")]
FractionOpt = Annotated[float, typer.Option(
    help="Fraction of the images the score uses (a seeded random subset).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of that subset: the same seed repeats exactly.")]
BatchOpt = Annotated[int, typer.Option(help="Images per forward batch.")]
SizeOpt = Annotated[int, typer.Option(help="Images are resized to SIZE x SIZE.")]
_HEAD_METRICS = [name for name, m in METRICS.items() if m.needs_head]
MetricOpt = Annotated[list[str], typer.Option(
    "--metric", metavar="NAME[,NAME...]",
    help=f"Metrics to compute, one column each; the first ranks. {', '.join(METRICS)} "
         f"({' and '.join(_HEAD_METRICS)} need the checkpoint's source classifier).")]
DtypeOpt = Annotated[Dtype, typer.Option(
    help="Forward dtype: bfloat16 is for accelerators (features change slightly; the score "
         "stays float64).")]
EngineOpt = Annotated[Engine, typer.Option(
    help="Forward engine: auto (onnxruntime for a float32 forward on CPU when installed, else "
         "jax), jax, or onnxruntime (the [cpu] extra).")]
WorkersOpt = Annotated[int | None, typer.Option(
    help="Image decode threads (default: one per core, at most 8); 0 decodes inline.")]
CacheDirOpt = Annotated[Path | None, typer.Option(
    help="Feature cache folder.",
    show_default="features/ in $DDSCORE_JAX_CACHE, else in ~/.cache/ddscore-jax")]


class OneLineUsageErrors(typer.core.TyperGroup):
    """The root command group: Click's usage errors (a missing argument, an unknown option, a
    value not among an option's choices) become InputError, so they too are one line and exit 2
    (:func:`run`), not a boxed panel. A bare command still prints its help."""

    def make_context(self, *args, **kwargs) -> typer.Context:
        try:
            return super().make_context(*args, **kwargs)
        except _clickx.NoArgsIsHelpError:
            raise
        except _clickx.UsageError as e:
            raise _usage(e) from None

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _clickx.NoArgsIsHelpError:
            raise
        except _clickx.UsageError as e:
            raise _usage(e) from None


def _usage(e: _clickx.UsageError) -> InputError:
    where = e.ctx.command_path if e.ctx is not None else "ddscore-jax"
    return InputError(f"{e.format_message()} (see `{where} --help`)")


def split(values: list[str]) -> list[str]:
    """``--metric a,b --metric c`` -> ``[a, b, c]``."""
    return [v for value in values for v in value.split(",")]


def write_json(doc: object, dest: str | None) -> None:
    """``doc`` to ``dest``: nothing for None, stdout for '-', else the file, written atomically."""
    if dest is None:
        return
    text = json.dumps(doc, indent=2)
    if dest == "-":
        print(text)
        return
    path = Path(dest)
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    write_json_atomic(path, doc)


def check_json(dest: str | None) -> None:
    """Fail before any work when ``--json`` cannot be written: a folder, or a location that
    refuses files (the probe's OSError is reported in one line by :func:`run`)."""
    if dest is None or dest == "-":
        return
    path = Path(dest)
    if path.is_dir():
        raise InputError(f"{path}: --json names a folder; give a file path")
    if path.parent.is_dir():  # a missing folder is reported when the results are written
        with tempfile.TemporaryFile(dir=path.parent):
            pass


def refuse_clobber(dest: str | os.PathLike | None, *inputs: Path) -> None:
    """Refuse, before any work, an output path that would overwrite one of the command's inputs:
    an input itself, a file already inside an input folder (``ZOO/zoo.json``, an image, a feature
    file), or anything inside a zoo's checkpoint folder."""
    if dest is None or str(dest) == "-":
        return
    target = Path(dest).resolve()
    for given in inputs:
        folder = Path(given).resolve()
        inside = folder in target.parents
        if target == folder or (inside and target.exists()) or \
                (folder / "zoo.json").is_file() and (folder / "checkpoints") in [
                    target, *target.parents]:
            raise InputError(f"{dest}: would overwrite an input of this command (in {given}); "
                             "write the output elsewhere")


# ------------------------------------------------------------------ exceptions to exit codes


class _Stderr(logging.Handler):
    """The library's warnings (a recomputed cache entry, a wait for a lock), one line each, on
    whatever ``sys.stderr`` is at the time (rich redirects it above its progress bars)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("ddscore_jax")
    if not logger.handlers:
        logger.addHandler(_Stderr(logging.WARNING))
        logger.propagate = False


def run(app: Callable[[], object], *, process: bool = True) -> None:
    """Run ``app`` as the console entry point: the one place that turns exceptions into exit
    codes (docs/interface.md).

    2 with one line for the user's input (InputError, and Click's usage errors, which
    :class:`OneLineUsageErrors` turns into it) and for the user's environment: an OSError whose
    errno says full disk, read-only or forbidden location, a file where a folder belongs (or the
    reverse), or no memory; the line names the path and the remedy. Writers remove what they had
    half-written before the error reaches here. An interrupt (Ctrl-C, SIGTERM) says what was
    kept. 1 for our own bugs.

    ``process=False`` (tests running the command in-process) leaves the process-wide state alone:
    signal handlers, exception hooks, the library's log handler and levels, and the hard exit
    past waiting threads.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if process:
        _log_to_stderr()
        interrupts.install()
    if process and not os.environ.get("DDSCORE_JAX_DEBUG"):
        # A failed Orbax save also surfaces in its own threads and callbacks: logged tracebacks,
        # "Event loop is closed" printed by tensorstore through sys.excepthook. The error reaches
        # us too and is reported as one line, so those stay quiet.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.excepthook = lambda *exc: None
        threading.excepthook = lambda args: None

    def leave(code: int) -> NoReturn:
        """Exit now, even past a library thread left waiting: after a failed save, Orbax's
        signalling threads (not daemons) wait for a signal that never comes, and the interpreter
        would join them for their whole timeout. Writers have removed their temporaries before
        the error got here."""
        sys.stdout.flush()
        sys.stderr.flush()
        if process and any(t.is_alive() and not t.daemon for t in threading.enumerate()
                           if t is not threading.main_thread()):
            os._exit(code)
        sys.exit(code)

    def fail(message: str) -> NoReturn:
        # One line, no traceback: it is the user's file, option or machine, not our bug.
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        leave(2)

    def internal(e: BaseException) -> NoReturn:
        if os.environ.get("DDSCORE_JAX_DEBUG"):
            raise e
        print(f"internal error: {type(e).__name__}: {e} "
              "(set DDSCORE_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
        leave(1)

    def interrupted(e: KeyboardInterrupt) -> NoReturn:
        line, code = interrupts.exit_line(e)
        print(line, file=sys.stderr)
        sys.exit(code)

    try:
        if os.environ.get("DDSCORE_JAX_DISTRIBUTED"):  # multi-host: join before any device use
            from ddscore_jax.forward import initialize_distributed

            initialize_distributed()
        app()
    except InputError as e:
        fail(str(e))
    except MemoryError:
        fail(environment_message(OSError(errno.ENOMEM, "out of memory")) or "out of memory")
    except OSError as e:
        message = environment_message(e)
        if message is None:
            internal(e)
        fail(message)
    except ValueError as e:  # an OSError that a library (tensorstore) passed on as text
        found = os_error_in_text(e)
        if found is None:
            internal(e)
        fail(environment_message(found))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (interrupts.Terminated)
        interrupted(e)
    except SystemExit as e:
        # Typer turns an interrupt into a silent exit 130; find it to say what was kept.
        cause = e.__context__
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        interrupted(cause)
    except Exception as e:  # noqa: BLE001 - last resort: say it is ours, show the trace on request
        internal(e)

"""What every command shares: the console, progress bars, the JSON writer, the options, and the one
place that turns exceptions into exit codes (docs/interface.md).

Option defaults are read from the library's settings classes (:mod:`ddscore_jax.settings`,
:class:`ddscore_jax.finetuning.Settings`, :class:`ddscore_jax.evaluation.Settings`), never typed
here, and their ``check`` is the one validation of the values; choices are ``Literal`` types, so
``--help`` lists them and Click refuses others with exit 2.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from ddscore_jax import interrupts
from ddscore_jax.atomic import check_writable, write_json_atomic
from ddscore_jax.errors import InputError, environment_message, os_error_in_text
from ddscore_jax.progress import Bars as _LibraryBars
from ddscore_jax.settings import HEAD_METRICS, METRIC_NAMES, Dtype, Engine

# Typer 0.2x carries its own copy of Click: its usage errors are these classes, not click's.
_click = typer.core._click
_clickx = _click.exceptions

# Neither console reads rich markup or emoji codes: every string printed (a path, a model or class
# name, a message naming them) prints as given. stderr: progress, notes, warnings; stdout: results.
# Piped or redirected (`> ranking.txt`), a table keeps its natural width instead of folding its
# cells into 80 columns (a terminal's own width, or $COLUMNS, still wins).
_PIPED_WIDTH = 240


def _console(stream) -> Console:
    width = None if stream.isatty() or os.environ.get("COLUMNS") else _PIPED_WIDTH
    return Console(file=stream, width=width, markup=False, emoji=False, highlight=False)


class _Stream:
    """sys.stdout/sys.stderr as they are at each write (tests and rich's progress swap them)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr):
        return getattr(getattr(sys, self.name), attr)


console = _console(_Stream("stderr"))
stdout = _console(_Stream("stdout"))


class _State:
    quiet = False  # --quiet: no progress bars and no notes (errors, warnings and results stay)


def examples(*lines: str) -> str:
    """A command's help epilog: its example command lines, kept as written."""
    # Click keeps a paragraph that starts with \b as it is (no rewrapping).
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def note(text: str) -> None:
    """A note for the person watching (what was written, what was reused): stderr, unless
    --quiet."""
    if not _State.quiet:
        console.print(text, soft_wrap=True)  # a path is never broken across lines


def results_console(*machine_outputs: str | None) -> Console:
    """Where a command's table goes: stdout, unless a machine output (``--json -``,
    ``--csv -``) claims it, then stderr, so that stdout holds only that output."""
    return console if "-" in machine_outputs else stdout


class _NoBars:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def bars() -> _NoBars | _LibraryBars:
    """The progress callback for a command: rich bars on stderr, none with --quiet."""
    return _NoBars() if _State.quiet else _LibraryBars(console)


Bars = bars  # the name the commands use


def _set_quiet(value: bool) -> None:
    if value:
        _State.quiet = True


@functools.cache
def _quiet_option() -> typer.core.TyperOption:
    """``--quiet``/``-q``, as Typer builds it (taken from a one-option command): every command
    gets it without a parameter of its own."""
    probe = typer.Typer(add_completion=False)

    @probe.command()
    def _probe(quiet: Annotated[bool, typer.Option(
            "--quiet", "-q", is_eager=True, expose_value=False, callback=_set_quiet,
            help="No progress bars and no notes (results, warnings and errors still print)."
    )] = False) -> None:
        pass

    (option,) = typer.main.get_command(probe).params
    option.__class__ = _Option
    return option


def _capitals(param) -> str | None:
    """A parameter's metavar as the README writes it: its own, else the type in capitals (a
    choice as [a|b]); None for a flag, which takes no value."""
    if param.metavar is not None:
        return param.metavar
    if getattr(param, "is_flag", False):
        return None
    desc = param.type_descriptor
    if desc.is_choice:
        return "[" + "|".join(str(c) for c in desc.choices) + "]"
    if desc.is_path:
        return "PATH"
    kind = desc.annotation
    return {int: "N", float: "X", str: "TEXT"}.get(kind, getattr(kind, "__name__", "X").upper())


class _Argument(typer.core.TyperArgument):
    def display_type_rich(self, ctx) -> str | None:
        return None  # the name (ZOO, DATA) says it

    def _usage_display_name(self) -> str:
        name = self.metavar or self.name.upper()
        if self.metavar is None and self.nargs != 1:
            name += "..."
        return name if self.required else f"[{name}]"


class _Option(typer.core.TyperOption):
    def display_type_rich(self, ctx) -> str | None:
        return _capitals(self)


def _readable(params: list) -> None:
    # Typer builds its own parameter classes; these subclasses only change how help shows them.
    for p in params:
        if type(p) is typer.core.TyperArgument:
            p.__class__ = _Argument
        elif type(p) is typer.core.TyperOption:
            p.__class__ = _Option


class Command(typer.core.TyperCommand):
    """Every command: usage and metavars in capitals (``rank [OPTIONS] ZOO DATA``), no metavar on
    a flag, and ``--quiet``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _readable(self.params)
        self.params.append(_quiet_option())

ZooArg = Annotated[Path, typer.Argument(metavar="ZOO",
                                        help="Model zoo folder (made by `convert`).")]
DataArg = Annotated[Path, typer.Argument(
    metavar="DATA",
    help="Data set: a folder of class sub-folders, or one with train/ and valid/ inside.")]
JsonOpt = Annotated[str | None, typer.Option(
    "--json", metavar="PATH|-",
    help="Also write machine-readable results ('-': stdout, which then holds only the JSON; the "
         "table goes to stderr).")]
CsvOpt = Annotated[str | None, typer.Option(
    "--csv", metavar="PATH|-",
    help="Also write the ranking as CSV, one row per model ('-': stdout, which then holds only "
         "the CSV; the table goes to stderr).")]
ResamplesOpt = Annotated[int, typer.Option(
    metavar="N", help="Bootstrap replicates of the scored images behind the intervals, P(best) "
                      "and the leader's group (0: off; seeded by --seed).")]
FractionOpt = Annotated[float, typer.Option(
    metavar="F", help="Fraction of the images the score uses (a seeded random subset).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of that subset: the same seed repeats exactly.")]
BatchOpt = Annotated[int, typer.Option(metavar="N", help="Images per forward batch.")]
SizeOpt = Annotated[int, typer.Option(metavar="SIZE", help="Images are resized to SIZE x SIZE.")]
MetricOpt = Annotated[list[str], typer.Option(
    "--metric", metavar="NAME[,NAME...]",
    help=f"Metrics to compute, one column each; the first ranks. {', '.join(METRIC_NAMES)} "
         f"({' and '.join(HEAD_METRICS)} need the checkpoint's source classifier).")]
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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _readable(self.params)
        self.params.append(_quiet_option())  # `ddscore-jax --quiet COMMAND` works too

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


def write_csv(ranking, dest: str | None) -> None:
    """``ranking`` as CSV (``Ranking.to_csv``) to ``dest``: nothing for None, stdout for '-',
    else the file, written atomically."""
    if dest is None:
        return
    if dest == "-":
        ranking.to_csv(sys.stdout)
        return
    path = Path(dest)
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    ranking.to_csv(path)


def check_json(dest: str | None) -> None:
    """Fail before any work when a ``--json``/``--csv`` file cannot be written: a folder, or a
    location that refuses files (the probe's OSError is reported in one line by :func:`run`)."""
    if dest is None or dest == "-":
        return
    path = Path(dest)
    if path.is_dir():
        raise InputError(f"{path}: names a folder; give a file path")
    if path.parent.is_dir():  # a missing folder is reported when the results are written
        check_writable(path)


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
    _State.quiet = False  # set by --quiet while parsing
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
        # tensorstore's callbacks into an event loop Orbax has closed after the error: reported
        # as unraisable, one traceback per write still in flight.
        sys.unraisablehook = lambda unraisable: None

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

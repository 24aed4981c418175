"""``ddscore-jax``: a thin Typer front over the library. Parse, call, print.

People read stderr (tables, progress); machines read ``--json`` (stdout with ``-``, or a file).
Exit codes (docs/interface.md): 0 success, 2 bad usage or bad input (one line, no traceback),
1 internal error.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ddscore_jax import __version__, interrupts
from ddscore_jax.cli import trust
from ddscore_jax.errors import InputError, environment_message, os_error_in_text

app = typer.Typer(
    name="ddscore-jax",
    help="Rank pre-trained ResNets for a small labelled image set with D-deepscore.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="Inspect a model zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True)

ZooArg = Annotated[Path, typer.Argument(help="Model zoo folder (made by `convert`).")]
DataArg = Annotated[Path, typer.Argument(
    help="Data set: a folder of class sub-folders, or one with train/ and valid/ inside.")]
JsonOpt = Annotated[str | None, typer.Option(
    "--json", metavar="PATH|-", help="Also write machine-readable results ('-' for stdout).")]
FractionOpt = Annotated[float, typer.Option(
    help="Fraction of the images the score uses (a seeded random subset).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of that subset: the same seed repeats exactly.")]
BatchOpt = Annotated[int, typer.Option(help="Images per forward batch.", min=1)]
SizeOpt = Annotated[int, typer.Option(help="Images are resized to SIZE x SIZE.")]
MetricOpt = Annotated[list[str], typer.Option(
    "--metric", metavar="NAME[,NAME...]",
    help="Metrics to compute, one column each; the first ranks. ddscore, hscore, "
         "shrinkage_hscore, logme, transrate, gbc, knn, leep, nce (the last two need the "
         "checkpoint's source classifier).")]
DtypeOpt = Annotated[str, typer.Option(
    help="Forward dtype: float32, or bfloat16 for accelerators (features change slightly; the "
         "score stays float64).")]
EngineOpt = Annotated[str, typer.Option(
    help="Forward engine: auto (onnxruntime for a float32 forward on CPU when installed, "
         "else jax), jax, or onnxruntime (the [cpu] extra).")]
WorkersOpt = Annotated[int | None, typer.Option(
    help="Image decode threads (default: one per core, at most 8); 0 decodes inline.", min=0)]


def _version(value: bool) -> None:
    if value:
        print(f"ddscore-jax {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Rank pre-trained ResNets for a small labelled image set with D-deepscore."""


class _Bars:
    """The library's ``progress(description, completed, total)`` callback as rich progress bars."""

    def __init__(self) -> None:
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _Bars:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def __call__(self, description: str, completed: int, total: int) -> None:
        if description not in self.tasks:
            self.tasks[description] = self.bars.add_task(description, total=total)
        self.bars.update(self.tasks[description], completed=completed, total=total)


def _split(values: list[str]) -> list[str]:
    """``--metric a,b --metric c`` -> ``[a, b, c]``."""
    return [v for value in values for v in value.split(",")]


def _check_json(dest: str | None) -> None:
    """Fail before any work when ``--json`` cannot be written: a folder, or a location that
    refuses files (the probe's OSError is reported in one line by ``main``)."""
    if dest is None or dest == "-":
        return
    path = Path(dest)
    if path.is_dir():
        raise InputError(f"{path}: --json names a folder; give a file path")
    if path.parent.is_dir():  # a missing folder is reported when the results are written
        with tempfile.TemporaryFile(dir=path.parent):
            pass


def _write_json(doc: object, dest: str | None) -> None:
    if dest is None:
        return
    text = json.dumps(doc, indent=2)
    if dest == "-":
        print(text)
        return
    from ddscore_jax.zoo import write_json_atomic

    path = Path(dest)
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist")
    write_json_atomic(path, doc)


def _refuse_clobber(dest: str | os.PathLike | None, *inputs: Path) -> None:
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


def _print_ranking(ranking, title: str) -> None:
    metrics = ranking.settings["metrics"]
    caption = f"score precision: {ranking.settings['precision']}"
    if len(metrics) > 1 or metrics[0] != "ddscore":
        caption += f"; ranked by {metrics[0]}"
    table = Table(title=title, caption=caption)
    table.add_column("rank", justify="right")
    table.add_column("model")
    # D-deepscore alone: its two block scores too. Several metrics: one column each.
    blocks = ranking.settings["blocks"] if metrics == ["ddscore"] else []
    for name in metrics:
        table.add_column("D-deepscore" if name == "ddscore" else name, justify="right")
    for block in blocks:
        table.add_column(block, justify="right")
    for i, m in enumerate(ranking.models, 1):
        values = [m.metrics.get(k, float("nan")) for k in metrics]
        table.add_row(str(i), m.name, *("n/a" if v != v else f"{v:.6f}" for v in values),
                      *(f"{m.block_scores[b]:.6f}" for b in blocks))
    console.print(table)


@app.command()
def convert(
    sources: Annotated[list[Path], typer.Argument(
        help="Checkpoints: .safetensors, .pth, .pt, .bin, .pth.tar, .ckpt, .onnx files, model "
             "folders (config.json + weights, as save_pretrained or hf download write them), or "
             "folders of these.")],
    zoo_dir: Annotated[Path, typer.Option("--zoo", help="Zoo folder (created if missing).")],
    name: Annotated[str | None, typer.Option(
        help="Name in the zoo (only with a single source); default: the file's stem or the "
             "model folder's name.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a different model that has the same name.")] = False,
) -> None:
    """Import ResNet v1 checkpoints into a model zoo, each on its own (exit 2 if any is refused)."""
    from ddscore_jax.convert import convert_sources

    try:
        with _Bars() as bars:
            result = convert_sources(sources, zoo_dir, name=name, overwrite=overwrite,
                                     progress=bars)
    except KeyboardInterrupt as e:
        if not getattr(e, "__notes__", None):  # stopped before the zoo was touched
            e.add_note(f"nothing was added to {zoo_dir}")
        raise
    for n in result.written:
        console.print(f"added [bold]{n}[/bold] to {zoo_dir}")
    for n in result.unchanged:
        console.print(f"{n}: already in {zoo_dir}, unchanged")
    for line in result.refused:
        # Plain print: a refusal names a user's path, which rich would read as markup.
        print(f"error: {line}", file=sys.stderr)
    if result.refused:
        raise typer.Exit(2)


@app.command()
def extract(
    zoo_dir: ZooArg,
    data_root: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for <model>.npz feature files.")],
    batch_size: BatchOpt = 32,
    image_size: SizeOpt = 224,
    dtype: DtypeOpt = "float32",
    workers: WorkersOpt = None,
    engine: EngineOpt = "auto",
) -> None:
    """Write the conv4_x features of every zoo model on DATA to OUT/<model>.npz."""
    from ddscore_jax import api, zoo

    for e in zoo.read(zoo_dir):
        _refuse_clobber(out / f"{e.name}.npz", zoo_dir, data_root)
    with _Bars() as bars:
        written = api.extract(zoo_dir, data_root, out, batch_size=batch_size,
                              image_size=image_size, dtype=dtype, workers=workers, engine=engine,
                              progress=bars)
    for path in written:
        console.print(f"wrote {path}")


@app.command()
def score(
    feats: Annotated[Path, typer.Argument(help="Folder of <model>.npz files from `extract`.")],
    train_fraction: FractionOpt = 0.8,
    seed: SeedOpt = 0,
    metric: MetricOpt = ["ddscore"],  # noqa: B006 - Typer reads the default, never mutates it
    json_out: JsonOpt = None,
) -> None:
    """D-deepscore of every feature file in FEATS, ranked."""
    from ddscore_jax import api

    _refuse_clobber(json_out, feats)
    _check_json(json_out)
    with _Bars() as bars:
        ranking = api.score(feats, train_fraction=train_fraction, seed=seed,
                            metrics=_split(metric), progress=bars)
    _print_ranking(ranking, f"D-deepscore of {feats}")
    _write_json(ranking.to_json(), json_out)


@app.command()
def rank(
    zoo_dir: ZooArg,
    data_root: DataArg,
    train_fraction: FractionOpt = 0.8,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
    image_size: SizeOpt = 224,
    json_out: JsonOpt = None,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Feature cache folder [default: ~/.cache/ddscore-jax/features].")] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Neither read nor write cached features.")] = False,
    dtype: DtypeOpt = "float32",
    workers: WorkersOpt = None,
    metric: MetricOpt = ["ddscore"],  # noqa: B006 - Typer reads the default, never mutates it
    engine: EngineOpt = "auto",
) -> None:
    """Rank every zoo model for DATA: extract (or reuse cached) features, score, print."""
    from ddscore_jax import api

    _refuse_clobber(json_out, zoo_dir, data_root, *([cache_dir] if cache_dir else []))
    _check_json(json_out)
    with _Bars() as bars:
        ranking = api.rank(zoo_dir, data_root, batch_size=batch_size, image_size=image_size,
                           train_fraction=train_fraction, seed=seed, cache_dir=cache_dir,
                           use_cache=not no_cache, dtype=dtype, workers=workers,
                           metrics=_split(metric), engine=engine, progress=bars)
    if ranking.cached:
        console.print(f"reused cached features of {len(ranking.cached)} model(s)")
    _print_ranking(ranking, f"{data_root}: {ranking.dataset['n_images']} images, "
                            f"{len(ranking.dataset['classes'])} classes")
    _write_json(ranking.to_json(), json_out)


@zoo_app.command("list")
def zoo_list(zoo_dir: ZooArg, json_out: JsonOpt = None) -> None:
    """The models in a zoo: name, architecture, source file, sha256."""
    from dataclasses import asdict

    _check_json(json_out)
    from ddscore_jax import zoo

    _refuse_clobber(json_out, zoo_dir)
    entries = zoo.read(zoo_dir)
    table = Table(title=f"{zoo_dir}: {len(entries)} model(s)")
    for col in ("name", "arch", "source", "format", "sha256"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(e.name, e.arch, e.source, e.source_format, e.sha256)
    console.print(table)
    _write_json({"models": [asdict(e) for e in entries]}, json_out)


@app.command()
def demo(
    cache_dir: Annotated[Path | None, typer.Option(
        help="Where the demo zoo and data are built [default: ~/.cache/ddscore-jax/demo].")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Build a small zoo and target set from packaged data (no downloads), then rank."""
    from ddscore_jax import api
    from ddscore_jax import demo as demo_lib

    _check_json(json_out)
    with _Bars() as bars:
        zoo_dir, data_root = demo_lib.prepare_demo(cache_dir or demo_lib.default_cache_dir(),
                                                   progress=bars)
        ranking = api.rank(zoo_dir, data_root, image_size=demo_lib.DEMO_IMAGE_SIZE,
                           cache_dir=Path(zoo_dir).parent / "features", progress=bars)
    console.print(f"demo zoo: {zoo_dir}\ndemo data: {data_root}")
    _print_ranking(ranking, f"demo: {ranking.dataset['n_images']} images of "
                            f"{', '.join(ranking.dataset['classes'])}")
    _write_json(ranking.to_json(), json_out)


trust.register(app)  # finetune, evaluate


def _fail(message: str) -> NoReturn:
    # One line, no traceback: it is the user's file, option or machine, not our bug.
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    _exit(2)


def _exit(code: int) -> NoReturn:
    """Exit now, even past a library thread left waiting: after a failed save, Orbax's signalling
    threads (not daemons) wait for a signal that never comes, and the interpreter would join them
    for their whole timeout. Writers have removed their temporaries before the error got here."""
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        os._exit(code)
    sys.exit(code)


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


def _exit_interrupted(e: KeyboardInterrupt) -> None:
    line, code = interrupts.exit_line(e)
    print(line, file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console entry point: the one place that turns exceptions into exit codes.

    2 with one line for the user's input (InputError) and for the user's environment: an OSError
    whose errno says full disk, read-only or forbidden location, a file where a folder belongs
    (or the reverse), or no memory; the line names the path and the remedy. Writers remove what
    they had half-written before the error reaches here.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _log_to_stderr()
    interrupts.install()
    if not os.environ.get("DDSCORE_JAX_DEBUG"):
        # A failed Orbax save also surfaces in its own threads and callbacks: logged tracebacks,
        # "Event loop is closed" printed by tensorstore through sys.excepthook. The error reaches
        # us too and is reported as one line, so those stay quiet.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.excepthook = lambda *exc: None
        threading.excepthook = lambda args: None
    try:
        if os.environ.get("DDSCORE_JAX_DISTRIBUTED"):  # multi-host: join before any device use
            from ddscore_jax.extract import initialize_distributed

            initialize_distributed()
        app()
    except InputError as e:
        _fail(str(e))
    except MemoryError:
        _fail(environment_message(OSError(errno.ENOMEM, "out of memory")) or "out of memory")
    except OSError as e:
        message = environment_message(e)
        if message is None:
            _internal(e)
        _fail(message)
    except ValueError as e:  # an OSError that a library (tensorstore) passed on as text
        found = os_error_in_text(e)
        if found is None:
            _internal(e)
        _fail(environment_message(found))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (interrupts.Terminated)
        _exit_interrupted(e)
    except SystemExit as e:
        # Typer turns an interrupt into a silent exit 130; find it to say what was kept.
        cause = e.__context__
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        _exit_interrupted(cause)
    except Exception as e:  # noqa: BLE001 - last resort: say it is ours, show the trace on request
        _internal(e)


def _internal(e: BaseException) -> NoReturn:
    if os.environ.get("DDSCORE_JAX_DEBUG"):
        raise e
    print(f"internal error: {type(e).__name__}: {e} "
          "(set DDSCORE_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
    _exit(1)


if __name__ == "__main__":
    main()

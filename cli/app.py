"""``ddscore-jax``: a thin Typer front over the library. Parse, call, print.

People read the tables on stdout (progress, notes and warnings go to stderr); machines read
``--json``/``--csv`` (a file, or stdout with ``-``, which then holds only that output and the
table moves to stderr).
Exit codes (docs/interface.md): 0 success, 2 bad usage or bad input (one line, no traceback),
1 internal error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ddscore_jax import __version__
from ddscore_jax.cli import ranking_table, trust
from ddscore_jax.cli._common import (
    Bars,
    BatchOpt,
    CacheDirOpt,
    Command,
    CsvOpt,
    DataArg,
    DtypeOpt,
    EngineOpt,
    FractionOpt,
    JsonOpt,
    MetricOpt,
    OneLineUsageErrors,
    ResamplesOpt,
    SeedOpt,
    SizeOpt,
    WorkersOpt,
    ZooArg,
    check_json,
    examples,
    note,
    refuse_clobber,
    results_console,
    run,
    split,
    write_csv,
    write_json,
)
from ddscore_jax.settings import ExtractSettings, ScoreSettings

_E, _S = ExtractSettings, ScoreSettings  # every option default is read from these

app = typer.Typer(
    name="ddscore-jax",
    cls=OneLineUsageErrors,
    help="Rank pre-trained ResNets for a small labelled image set with D-deepscore.",
    no_args_is_help=True,
    # Plain help, as the README reads: rich markup would eat a "[cpu]" in a help text.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="Inspect a model zoo.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(zoo_app, name="zoo")

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


def _show(ranking, title: str, json_out: str | None, csv_out: str | None,
          zoo_dir: Path | None, data_root: Path | None) -> None:
    """The table (stdout, or stderr when stdout holds --json/--csv), the next-step note, and the
    machine outputs."""
    ranking_table.print_ranking(ranking, title, results_console(json_out, csv_out))
    line = ranking_table.next_step(ranking, zoo_dir, data_root, json_out)
    if line is not None:
        note(line)
    write_json(ranking.to_json(), json_out)
    write_csv(ranking, csv_out)


@app.command(cls=Command, epilog=examples(
    "ddscore-jax convert ~/models/ --zoo zoo/              # every checkpoint in a folder",
    "ddscore-jax convert resnet18.pth --zoo zoo/ --name r18",
    "ddscore-jax convert ~/hf/resnet-50/ --zoo zoo/        # a hub model folder"))
def convert(
    sources: Annotated[list[Path], typer.Argument(
        help="Checkpoints: .safetensors, .pth, .pt, .bin, .pth.tar, .ckpt, .onnx files, model "
             "folders (config.json + weights, as save_pretrained or hf download write them), "
             "folders of these, or the Hugging Face cache: its root, a models--org--name folder, "
             "or a repo id org/name.")],
    zoo_dir: Annotated[Path, typer.Option("--zoo", metavar="ZOO",
                                          help="Zoo folder (created if missing).")],
    name: Annotated[str | None, typer.Option(
        metavar="NAME",
        help="Name in the zoo (only with a single source); default: the file's stem or the "
             "model folder's name.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace a different model that has the same name.")] = False,
) -> None:
    """Import ResNet v1 checkpoints into a model zoo, each on its own (exit 2 if any is refused)."""
    from ddscore_jax.conversion import convert_sources

    try:
        with Bars() as bars:
            result = convert_sources(sources, zoo_dir, name=name, overwrite=overwrite,
                                     progress=bars)
    except KeyboardInterrupt as e:
        if not getattr(e, "__notes__", None):  # stopped before the zoo was touched
            e.add_note(f"nothing was added to {zoo_dir}")
        raise
    for n in result.written:
        note(f"added {n} to {zoo_dir}")
    for n in result.unchanged:
        note(f"{n}: already in {zoo_dir}, unchanged")
    for line in result.skipped:
        print(f"skipped: {line}", file=sys.stderr)  # plain print: it names a user's path
    for line in result.refused:
        print(f"error: {line}", file=sys.stderr)
    if result.refused:
        raise typer.Exit(2)


@app.command(cls=Command, epilog=examples(
    "ddscore-jax extract zoo/ data/ --out feats/ && ddscore-jax score feats/"))
def extract(
    zoo_dir: ZooArg,
    data_root: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Folder for <model>.npz feature files.")],
    batch_size: BatchOpt = _E.batch_size,
    image_size: SizeOpt = _E.image_size,
    dtype: DtypeOpt = _E.dtype,
    workers: WorkersOpt = _E.workers,
    engine: EngineOpt = _E.engine,
) -> None:
    """Write the conv4_x features of every zoo model on DATA to OUT/<model>.npz."""
    from ddscore_jax import api, zoo

    for e in zoo.read(zoo_dir):
        refuse_clobber(out / f"{e.name}.npz", zoo_dir, data_root)
    with Bars() as bars:
        written = api.extract(zoo_dir, data_root, out, batch_size=batch_size,
                              image_size=image_size, dtype=dtype, workers=workers, engine=engine,
                              progress=bars)
    for path in written:
        note(f"wrote {path}")


@app.command(cls=Command, epilog=examples(
    "ddscore-jax score feats/ --csv ranking.csv",
    "ddscore-jax score feats/ --json - | jq '.models[0].name'"))
def score(
    feats: Annotated[Path, typer.Argument(help="Folder of <model>.npz files from `extract`.")],
    train_fraction: FractionOpt = _S.train_fraction,
    seed: SeedOpt = _S.seed,
    metric: MetricOpt = list(_S.metrics),  # noqa: B006, B008 - Typer reads it, never mutates it
    resamples: ResamplesOpt = _S.resamples,
    json_out: JsonOpt = None,
    csv_out: CsvOpt = None,
) -> None:
    """D-deepscore of every feature file in FEATS, ranked."""
    from ddscore_jax import api

    for dest in (json_out, csv_out):
        refuse_clobber(dest, feats)
        check_json(dest)
    with Bars() as bars:
        ranking = api.score(feats, train_fraction=train_fraction, seed=seed,
                            metrics=split(metric), progress=bars, resamples=resamples)
    _show(ranking, f"D-deepscore of {feats}", json_out, csv_out, None, None)


@app.command(cls=Command, epilog=examples(
    "ddscore-jax rank zoo/ data/ > ranking.txt               # the table alone on stdout",
    "ddscore-jax rank zoo/ data/ --json ranking.json --figure ranking.png",
    "ddscore-jax rank zoo/ data/ --csv - --quiet > ranking.csv",
    "ddscore-jax rank zoo/ data/train --metric ddscore,logme --resamples 1000"))
def rank(
    zoo_dir: ZooArg,
    data_root: DataArg,
    train_fraction: FractionOpt = _S.train_fraction,
    seed: SeedOpt = _S.seed,
    batch_size: BatchOpt = _E.batch_size,
    image_size: SizeOpt = _E.image_size,
    json_out: JsonOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Neither read nor write cached features.")] = False,
    dtype: DtypeOpt = _E.dtype,
    workers: WorkersOpt = _E.workers,
    metric: MetricOpt = list(_S.metrics),  # noqa: B006, B008 - Typer reads it, never mutates it
    engine: EngineOpt = _E.engine,
    figure: Annotated[Path | None, typer.Option(
        "--figure", metavar="PATH", help="Also draw the ranking (.png, .svg or .pdf): intervals, "
        "the leader's group, and how the metrics' rankings agree.")] = None,
    resamples: ResamplesOpt = _S.resamples,
    csv_out: CsvOpt = None,
) -> None:
    """Rank every zoo model for DATA: extract (or reuse cached) features, score, print."""
    from ddscore_jax import api
    from ddscore_jax.figure import check_path, plot_ranking

    inputs = (zoo_dir, data_root, *([cache_dir] if cache_dir else []))
    for dest in (json_out, csv_out, figure):
        refuse_clobber(dest, *inputs)
    if figure is not None:
        check_path(figure)  # a bad suffix or folder fails before any work
    check_json(json_out)
    check_json(csv_out)
    with Bars() as bars:
        ranking = api.rank(zoo_dir, data_root, batch_size=batch_size, image_size=image_size,
                           train_fraction=train_fraction, seed=seed, cache_dir=cache_dir,
                           use_cache=not no_cache, dtype=dtype, workers=workers,
                           metrics=split(metric), engine=engine, progress=bars,
                           resamples=resamples)
    if ranking.cached:
        note(f"reused cached features of {len(ranking.cached)} model(s)")
    if figure is not None:
        plot_ranking(ranking, figure, title=f"{data_root}: {ranking.dataset['n_images']} images")
        note(f"figure: {figure}")
    _show(ranking, f"{data_root}: {ranking.dataset['n_images']} images, "
                   f"{len(ranking.dataset['classes'])} classes", json_out, csv_out, zoo_dir,
          data_root)


@zoo_app.command("list", cls=Command)
def zoo_list(zoo_dir: ZooArg, json_out: JsonOpt = None) -> None:
    """The models in a zoo: name, architecture, source file, sha256."""
    from dataclasses import asdict

    check_json(json_out)
    from ddscore_jax import zoo

    refuse_clobber(json_out, zoo_dir)
    entries = zoo.read(zoo_dir)
    table = Table()
    for col in ("name", "arch", "source", "format", "sha256"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(e.name, e.arch, e.source, e.source_format, e.sha256)
    shown = results_console(json_out)
    shown.print(f"{zoo_dir}: {len(entries)} model(s)", soft_wrap=True)
    shown.print(table)
    write_json({"models": [asdict(e) for e in entries]}, json_out)


@app.command(cls=Command)
def demo(
    cache_dir: Annotated[Path | None, typer.Option(
        help="Where the demo zoo and data are built.",
        show_default="demo/ in $DDSCORE_JAX_CACHE, else in ~/.cache/ddscore-jax")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Build a small zoo and target set from packaged data (no downloads), then rank."""
    from ddscore_jax import api
    from ddscore_jax import demo as demo_lib

    check_json(json_out)
    with Bars() as bars:
        zoo_dir, data_root = demo_lib.prepare_demo(cache_dir or demo_lib.default_cache_dir(),
                                                   progress=bars)
        ranking = api.rank(zoo_dir, data_root, image_size=demo_lib.DEMO_IMAGE_SIZE,
                           cache_dir=Path(zoo_dir).parent / "features", progress=bars)
    note(f"demo zoo: {zoo_dir}\ndemo data: {data_root}")
    _show(ranking, f"demo: {ranking.dataset['n_images']} images of "
                   f"{', '.join(ranking.dataset['classes'])}", json_out, None, zoo_dir, data_root)


trust.register(app)  # finetune, evaluate


def main() -> None:
    """Console entry point (exit codes: :func:`ddscore_jax.cli._common.run`)."""
    # The name in usage lines, also under `python -m ddscore_jax.cli`.
    run(lambda: app(prog_name="ddscore-jax"))


if __name__ == "__main__":
    main()

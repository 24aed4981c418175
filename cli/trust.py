"""``finetune`` and ``evaluate``: the ground truth for a ranking, and how well a ranking matches it.

Registered on the root app by :func:`register`. Option defaults, choices and validation are those
of :class:`ddscore_jax.finetuning.Settings` and :class:`ddscore_jax.evaluation.Settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ddscore_jax import evaluation as ev
from ddscore_jax.cli._common import (
    Bars,
    Command,
    JsonOpt,
    check_json,
    examples,
    note,
    results_console,
    write_json,
)
from ddscore_jax.errors import InputError
from ddscore_jax.settings import FinetuneSettings, Optimizer, Schedule

_D, _EV = FinetuneSettings, ev.Settings  # every option default is read from these


def register(app: typer.Typer) -> None:
    """Add the ``finetune`` and ``evaluate`` commands to ``app``."""
    app.command(cls=Command, epilog=examples(
        "ddscore-jax finetune zoo/ data/ --out finetuned.json",
        "ddscore-jax finetune zoo/ data/ --out finetuned.json --models a,b --seeds 3",
        "ddscore-jax rank zoo/ data/train --json ranking.json &&",
        "  ddscore-jax finetune zoo/ data/ --out finetuned.json --top 1 --ranking ranking.json"
    ))(finetune)
    app.command(cls=Command, epilog=examples(
        "ddscore-jax rank zoo/ data/train --json ranking.json",
        "ddscore-jax finetune zoo/ data/ --out finetuned.json --seeds 3",
        "ddscore-jax evaluate ranking.json finetuned.json --figure vs.png"))(evaluate)



def finetune(
    zoo_dir: Annotated[Path, typer.Argument(metavar="ZOO",
                                            help="Model zoo folder (made by `convert`).")],
    data_root: Annotated[Path, typer.Argument(
        metavar="DATA",
        help="Data set with train/, valid/ and best test/ inside: every model is fine-tuned on "
             "train/, its learning rate chosen on valid/ and its accuracy measured on test/ "
             "(without test/, valid/ is halved per class with a fixed seed; score DATA/train "
             "only).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Results file (JSON). Models already in it with the same checkpoint, data "
                      "and settings are skipped, so an interrupted run resumes.")],
    image_size: Annotated[int, typer.Option(
        metavar="SIZE",
        help="Images are resized to SIZE x SIZE (small by default: fine-tuning a zoo on a CPU "
             "at 224 takes hours).")] = _D.image_size,
    batch_size: Annotated[int, typer.Option(help="Images per training step.")] = _D.batch_size,
    epochs: Annotated[float, typer.Option(help="Passes over DATA/train.")] = _D.epochs,
    optimizer: Annotated[Optimizer, typer.Option(help="sgd is with momentum.")] = _D.optimizer,
    learning_rate: Annotated[list[float] | None, typer.Option(
        metavar="LR",
        help="Peak learning rate of the grid (repeat the option for several); each model's "
             "accuracy is that of its best rate.",
        show_default=", ".join(map(str, _D.learning_rates)))] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = _D.momentum,
    weight_decay: Annotated[float, typer.Option(
        help="Decoupled weight decay (adamw) or L2 decay (sgd); fixed, not searched.")
    ] = _D.weight_decay,
    schedule: Annotated[Schedule, typer.Option(
        help="cosine decays to 0 over the run.")] = _D.schedule,
    clip_norm: Annotated[float, typer.Option(
        help="Clip gradients to this global norm (0: no clipping).")] = _D.clip_norm,
    flip: Annotated[bool, typer.Option(
        "--flip/--no-flip", help="Augment with random horizontal flips.")] = _D.flip,
    seeds: Annotated[int, typer.Option(
        help="Runs per learning rate, with seeds SEED, SEED+1, ...: the results record their "
             "mean and spread.")] = _D.seeds,
    seed: Annotated[int, typer.Option(
        help="First seed of the batch order, the flips and any freshly initialised "
             "layer4.")] = _D.seed,
    json_out: JsonOpt = None,
    models: Annotated[str | None, typer.Option(
        "--models", metavar="NAME[,NAME...]", help="Fine-tune only these zoo models.")] = None,
    top: Annotated[int | None, typer.Option(
        "--top", metavar="K", help="Fine-tune the K best of --ranking, plus every model that "
        "cannot be told apart from them (K=1: the leader's group).")] = None,
    ranking: Annotated[Path | None, typer.Option(
        "--ranking", metavar="FILE", help="A `rank --json` file of this zoo, for --top.")] = None,
) -> None:
    """Fine-tune every zoo model (or those chosen) on DATA/train, choose its rate on the
    selection split and record its accuracy on the test split."""
    from ddscore_jax import finetuning as ft

    chosen = _chosen(zoo_dir, models, top, ranking)
    grid = tuple(learning_rate) if learning_rate else _D.learning_rates
    settings = ft.Settings(image_size=image_size, batch_size=batch_size, epochs=epochs,
                           optimizer=optimizer, learning_rates=grid, momentum=momentum,
                           weight_decay=weight_decay, schedule=schedule, clip_norm=clip_norm,
                           flip=flip, seeds=seeds, seed=seed)
    check_json(json_out)
    with Bars() as bars:
        doc = ft.finetune(zoo_dir, data_root, out, settings, progress=bars, models=chosen)
    # Titles and captions naming a path print on lines of their own: in a table they wrap mid-path.
    selection = doc["dataset"].get("selection")
    title = (f"{data_root}: test accuracy after fine-tuning "
             f"({doc['dataset']['held_out']['n_images']} test images"
             + ("" if selection is None else
                f", the rate chosen on {selection['n_images']} others") + "; "
             + doc["dataset"].get("layout", "") + ")")
    table = Table()
    for col, justify in (("model", "left"), ("test accuracy", "right"), ("sd", "right"),
                         ("selection acc.", "right"),
                         ("best lr", "right"), ("layer4", "left"), ("train loss", "right"),
                         ("seconds", "right")):
        table.add_column(col, justify=justify)
    for m in sorted(doc["models"], key=lambda m: -m["held_out_accuracy"]):
        chose = m.get("selection_accuracy")
        table.add_row(Text(m["name"]), f"{m['held_out_accuracy']:.4f}",
                      f"{m.get('held_out_accuracy_sd', 0.0):.4f}",
                      "n/a" if chose is None else f"{chose:.4f}",
                      f"{m.get('best_learning_rate', float('nan')):g}", m["layer4"],
                      f"{m['final_train_loss']:.4f}", f"{m['seconds']:.1f}")
    shown = results_console(json_out)
    shown.print(title, soft_wrap=True)
    shown.print(table)
    shown.print(f"results: {out}", soft_wrap=True)
    if any(m["layer4"] == "fresh" for m in doc["models"]):
        note("layer4 'fresh': the checkpoint has no layer4, so it was initialised from the seed "
             "and trained from scratch")
    write_json(doc, json_out)


def _chosen(zoo_dir: Path, models: str | None, top: int | None,
            ranking: Path | None) -> list[str] | None:
    """The models --models or --top/--ranking name (None: the whole zoo); InputError for a bad
    combination, an unknown name or a ranking of another zoo."""
    from ddscore_jax import finetuning as ft
    from ddscore_jax import shortlist, zoo

    if models is not None and (top is not None or ranking is not None):
        raise InputError("--models and --top/--ranking choose the models two ways; give one")
    if (top is None) != (ranking is None):
        raise InputError("--top K and --ranking FILE go together")
    if models is not None:
        names = [n.strip() for n in models.split(",") if n.strip()]
        ft.select(zoo.read_nonempty(zoo_dir), names, zoo_dir)  # an unknown name: before any work
        return names
    if top is None:
        return None
    doc = shortlist.read_ranking(ranking)
    names = shortlist.top(doc, top)
    shortlist.check_zoo(doc, names, zoo_dir, ranking)
    return names


def evaluate(
    files: Annotated[list[Path], typer.Argument(
        metavar="SCORES... ACCURACIES [SCORES... ACCURACIES]...",
        help="Per target: one or more `rank --json`/`score --json` files of DATA/train, then the "
             "`finetune` results of that DATA. Several targets: repeat the group; the means "
             "over targets are added.")],
    figure: Annotated[Path | None, typer.Option(
        help="The figure's PNG (one target; default: ACCURACIES with the suffix .png), or with "
             "several targets a folder for <target>.png (default: beside each ACCURACIES).")
    ] = None,
    no_figure: Annotated[bool, typer.Option("--no-figure", help="Draw no figure.")] = False,
    bootstrap: Annotated[int, typer.Option(
        help=f"Bootstrap replicates for the 95% intervals (over fine-tuning seeds, and over "
             f"targets for the means); at least {ev.MIN_BOOTSTRAP}.")] = _EV.bootstrap,
    json_out: JsonOpt = None,
) -> None:
    """Compare rankings with fine-tuned accuracy: tau_w, Kendall tau, Pearson, rel@1, rel@3.

    Each with a 95% bootstrap interval over the fine-tuning seeds; a metric is called better
    than another only where the interval of their difference in tau_w excludes 0. Prints a table
    per target (and the means over targets), writes --json and a figure per target of scores
    against accuracy (error bars: the seeds' spread).
    """
    settings = ev.Settings(bootstrap=bootstrap).check()
    check_json(json_out)
    groups = ev.group_files(files)
    summary = ev.evaluate_targets(groups, n_boot=settings.bootstrap, seed=settings.seed)
    stat_names = ("tau_w", "Kendall tau", "Pearson", *(f"rel@{k}" for k in ev.REL_AT))

    def fmt(value: float | None, interval: tuple[float, float] | None, signed: bool) -> str:
        if value is None:
            return "n/a"
        text = f"{value:+.3f}" if signed else f"{value:.3f}"
        if interval is not None:
            text += f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if signed else \
                f" [{interval[0]:.2f}, {interval[1]:.2f}]"
        return text

    for (_, accuracies), result in zip(groups, summary.targets, strict=True):
        seeds = sorted({k for m in result.metrics for k in m.seeds})
        title = f"target {result.target}: rankings against fine-tuned accuracy ({accuracies})"
        table = Table(caption=f"95% bootstrap intervals over {'/'.join(map(str, seeds))} "
                              f"fine-tuning seed(s) per model ({result.resampled} resampled); "
                              "null: random rankings"
                      if max(seeds) > 1 or result.resampled != "seeds" else
                      "one fine-tuning seed per model: no intervals (finetune --seeds N)")
        table.add_column("metric", no_wrap=True)
        table.add_column("models", justify="right")
        for col in stat_names:
            table.add_column(col, justify="right")
        for m in result.metrics:
            table.add_row(ev.label(m.metric), str(m.n_models),
                          *(fmt(m.value(k), m.intervals.get(k), not k.startswith("rel@"))
                            for k in ev.STATISTICS))
        if result.metrics and result.metrics[0].null:
            # What a ranking without information scores on these models: the null's central 95%.
            null = result.metrics[0].null
            table.add_row("null", str(result.metrics[0].n_models),
                          *(fmt(null[k]["mean"], tuple(null[k]["interval"])
                                if null[k]["interval"] and null[k]["interval"][0] is not None
                                else None, not k.startswith("rel@")) for k in ev.STATISTICS))
        shown = results_console(json_out)
        shown.print(title, soft_wrap=True)
        shown.print(table)
        for a, b in result.better:
            shown.print(f"  {ev.label(a)} ranks better than {ev.label(b)} (tau_w, 95% "
                        "interval of the difference above 0)")
        for metric, names in result.dropped.items():
            note(f"{ev.label(metric)}: no accuracy for {', '.join(names)} (left out)")
    if len(summary.targets) > 1:
        table = Table(title=f"mean over {len(summary.targets)} targets",
                      caption="95% bootstrap intervals over targets and seeds"
                      if summary.targets_resampled else
                      f"95% bootstrap intervals over seeds only (fewer than "
                      f"{ev.MIN_TARGETS_RESAMPLED} targets to resample: these targets only)")
        table.add_column("metric", no_wrap=True)
        for col in stat_names:
            table.add_column(col, justify="right")
        for metric, values in summary.mean.items():
            table.add_row(ev.label(metric),
                          *(fmt(*values[k], not k.startswith("rel@")) for k in ev.STATISTICS))
        shown = results_console(json_out)
        shown.print(table)
        for a, b in summary.better:
            shown.print(f"  over the targets, {ev.label(a)} ranks better than {ev.label(b)}")
    doc = summary.targets[0].to_json() if len(summary.targets) == 1 else summary.to_json()
    doc["settings"] = settings.to_json()
    if not no_figure:
        paths = []
        for (_, accuracies), result in zip(groups, summary.targets, strict=True):
            if figure is None:
                path = accuracies.with_suffix(".png")
            elif len(groups) == 1:
                path = figure
            else:
                path = figure / f"{result.target}.png"
            paths.append(str(ev.plot(result, path, title=f"target {result.target}: scores vs "
                                                       f"fine-tuned accuracy")))
            note(f"figure: {paths[-1]}")
        if len(paths) == 1:
            doc["figure"] = paths[0]
        else:
            doc["figures"] = paths
    write_json(doc, json_out)

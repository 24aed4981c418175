"""``finetune`` and ``evaluate``: the ground truth for a ranking, and how well a ranking matches it.

Registered on the root app by :func:`register`. The shared helpers of ``app.py`` (progress bars,
console, JSON output) are imported when a command runs, not at import, because ``app.py`` imports
this module while it is still being defined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddscore_jax.errors import InputError


def register(app: typer.Typer) -> None:
    """Add the ``finetune`` and ``evaluate`` commands to ``app``."""
    app.command()(finetune)
    app.command()(evaluate)


def finetune(
    zoo_dir: Annotated[Path, typer.Argument(help="Model zoo folder (made by `convert`).")],
    data_root: Annotated[Path, typer.Argument(
        help="Data set with train/ and valid/ inside: every model is fine-tuned on train/ and "
             "tested on valid/ (held out; score DATA/train only).")],
    out: Annotated[Path, typer.Option(
        "--out", help="Results file (JSON). Models already in it with the same checkpoint, data "
                      "and settings are skipped, so an interrupted run resumes.")],
    image_size: Annotated[int, typer.Option(
        help="Images are resized to SIZE x SIZE (small by default: fine-tuning a zoo on a CPU "
             "at 224 takes hours).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Images per training step.", min=1)] = 32,
    epochs: Annotated[float, typer.Option(help="Passes over DATA/train.")] = 10.0,
    optimizer: Annotated[str, typer.Option(help="adamw, or sgd (with momentum).")] = "adamw",
    learning_rate: Annotated[list[float] | None, typer.Option(
        help="Peak learning rate of the grid (repeat the option for several); each model's "
             "accuracy is that of its best rate. [default: 0.001, 0.0003, 0.0001]")] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(
        help="Decoupled weight decay (adamw) or L2 decay (sgd); fixed, not searched.")] = 1e-4,
    schedule: Annotated[str, typer.Option(
        help="cosine (decay to 0 over the run) or constant.")] = "cosine",
    clip_norm: Annotated[float, typer.Option(
        help="Clip gradients to this global norm (0: no clipping).")] = 1.0,
    flip: Annotated[bool, typer.Option(
        "--flip/--no-flip", help="Augment with random horizontal flips.")] = False,
    seeds: Annotated[int, typer.Option(
        help="Runs per learning rate, with seeds SEED, SEED+1, ...: the results record their "
             "mean and spread.")] = 1,
    seed: Annotated[int, typer.Option(
        help="First seed of the batch order, the flips and any freshly initialised "
             "layer4.")] = 0,
    json_out: Annotated[str | None, typer.Option(
        "--json", metavar="PATH|-", help="Also write the results ('-' for stdout).")] = None,
) -> None:
    """Fine-tune every zoo model on DATA/train and record its accuracy on DATA/valid."""
    from rich.table import Table

    from ddscore_jax import finetune as ft
    from ddscore_jax.cli.app import _Bars, _write_json, console

    grid = tuple(learning_rate) if learning_rate else ft.Settings.learning_rates
    settings = ft.Settings(image_size=image_size, batch_size=batch_size, epochs=epochs,
                           optimizer=optimizer, learning_rates=grid, momentum=momentum,
                           weight_decay=weight_decay, schedule=schedule, clip_norm=clip_norm,
                           flip=flip, seeds=seeds, seed=seed)
    with _Bars() as bars:
        doc = ft.finetune(zoo_dir, data_root, out, settings, progress=bars)
    table = Table(title=f"{data_root}: held-out accuracy after fine-tuning "
                        f"({doc['dataset']['held_out']['n_images']} images in valid/)",
                  caption=f"results: {out}")
    for col, justify in (("model", "left"), ("accuracy", "right"), ("sd", "right"),
                         ("best lr", "right"), ("layer4", "left"), ("train loss", "right"),
                         ("seconds", "right")):
        table.add_column(col, justify=justify)
    for m in sorted(doc["models"], key=lambda m: -m["held_out_accuracy"]):
        table.add_row(m["name"], f"{m['held_out_accuracy']:.4f}",
                      f"{m.get('held_out_accuracy_sd', 0.0):.4f}",
                      f"{m.get('best_learning_rate', float('nan')):g}", m["layer4"],
                      f"{m['final_train_loss']:.4f}", f"{m['seconds']:.1f}")
    console.print(table)
    if any(m["layer4"] == "fresh" for m in doc["models"]):
        console.print("layer4 'fresh': the checkpoint has no layer4, so it was initialised "
                      "from the seed and trained from scratch")
    _write_json(doc, json_out)


def evaluate(
    files: Annotated[list[Path], typer.Argument(
        metavar="SCORES... ACCURACIES",
        help="One or more `rank --json`/`score --json` files, then the `finetune` results.")],
    figure: Annotated[Path | None, typer.Option(
        help="PNG of scores against accuracy, a panel per metric (default: ACCURACIES with "
             "the suffix .png).")] = None,
    no_figure: Annotated[bool, typer.Option("--no-figure", help="Draw no figure.")] = False,
    json_out: Annotated[str | None, typer.Option(
        "--json", metavar="PATH|-", help="Also write the evaluation ('-' for stdout).")] = None,
) -> None:
    """Compare rankings with fine-tuned accuracy: tau_w, Kendall tau, Pearson, rel@1, rel@3.

    Prints a table (one row per metric), writes --json and a figure of scores against accuracy.
    """
    from rich.table import Table

    from ddscore_jax import evaluate as ev
    from ddscore_jax.cli.app import _write_json, console

    if len(files) < 2:
        raise InputError("evaluate: needs at least one SCORES file and then the ACCURACIES file")
    *scores, accuracies = files
    result = ev.evaluate(scores, accuracies)
    table = Table(title=f"rankings against fine-tuned accuracy ({accuracies})")
    table.add_column("metric")
    table.add_column("models", justify="right")
    for col in ("tau_w", "Kendall tau", "Pearson", *(f"rel@{k}" for k in ev.REL_AT)):
        table.add_column(col, justify="right")

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.3f}"

    for m in result.metrics:
        table.add_row(ev.label(m.metric), str(m.n_models), fmt(m.weighted_tau),
                      fmt(m.kendall_tau), fmt(m.pearson),
                      *(("n/a" if m.rel_at[k] is None else f"{m.rel_at[k]:.3f}")
                        for k in ev.REL_AT))
    console.print(table)
    for metric, names in result.dropped.items():
        console.print(f"{ev.label(metric)}: no accuracy for {', '.join(names)} (left out)")
    doc = result.to_json()
    if not no_figure:
        path = ev.plot(result, figure or accuracies.with_suffix(".png"),
                       title=f"scores vs fine-tuned accuracy: {accuracies.name}")
        console.print(f"figure: {path}")
        doc["figure"] = str(path)
    _write_json(doc, json_out)

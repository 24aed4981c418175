"""Fine-tuning ground truth, the evaluation of rankings against it, and the transfer benchmark.

The numbers of ``evaluate`` are checked against scipy called directly and rel@k by hand; the full
network against torchvision's own forward; ``finetune`` and ``evaluate`` through the real command
in a subprocess; the benchmark's ``--small`` run as CI runs it.
"""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, error_line, save_pth, torch_resnet, write_image_folder
from PIL import Image
from scipy import stats

from ddscore_jax import evaluate as ev
from ddscore_jax import finetune as ft
from ddscore_jax import model, zoo
from ddscore_jax.converters import load_checkpoint
from ddscore_jax.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SIZE = "32"
# Three classes, 32 px, batch 32, default optimiser: the same compiled train step as the
# benchmark's `defects` target, so the --small run below reuses it from the persistent cache.
CLASSES = ("crack", "ok", "scratch")


# ---------------------------------------------------------------------------------------------
# evaluate: the numbers


def test_metric_statistics_match_scipy():
    rng = np.random.default_rng(7)
    names = [f"m{i}" for i in range(9)]
    scores = dict(zip(names, rng.normal(size=9).tolist(), strict=True))
    acc = dict(zip(names, rng.uniform(0.3, 0.9, size=9).tolist(), strict=True))
    got = ev.evaluate_metric(scores, acc, "x")
    s = np.array([scores[n] for n in names])
    a = np.array([acc[n] for n in names])
    # Same library on the same numbers: equal to the last bit, bar summation order.
    assert got.weighted_tau == pytest.approx(stats.weightedtau(s, a).statistic, abs=1e-12)
    assert got.kendall_tau == pytest.approx(stats.kendalltau(s, a).statistic, abs=1e-12)
    assert got.pearson == pytest.approx(stats.pearsonr(s, a).statistic, abs=1e-12)
    assert got.n_models == 9
    by_score = sorted(names, key=lambda n: -scores[n])
    assert got.rel_at[1] == pytest.approx(acc[by_score[0]] / max(a), abs=1e-15)
    assert got.rel_at[3] == pytest.approx(max(acc[n] for n in by_score[:3]) / max(a), abs=1e-15)


def test_rel_at_k_by_hand_and_degenerate_inputs():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    acc = {"a": 0.5, "b": 0.6, "c": 0.8, "d": 0.4}
    got = ev.evaluate_metric(scores, acc)
    assert got.rel_at == {1: 0.5 / 0.8, 3: 1.0}
    # Three pairs agree (each with "d"), three disagree (the top three, reversed): Kendall's tau
    # is 0, and the weighted tau, which counts disagreements at the top more, is negative.
    assert got.kendall_tau == pytest.approx(0.0, abs=1e-15) and got.weighted_tau < 0
    perfect = ev.evaluate_metric({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 0.1, "b": 0.2, "c": 0.3})
    assert (perfect.weighted_tau, perfect.kendall_tau, perfect.rel_at[1]) == (1.0, 1.0, 1.0)
    assert perfect.pearson == pytest.approx(1.0, abs=1e-12)
    # Ties in score: the file's order (its ranking) decides, so "b" counts as the top model.
    tied = ev.evaluate_metric({"b": 1.0, "a": 1.0}, {"a": 0.9, "b": 0.3})
    assert tied.rel_at[1] == pytest.approx(0.3 / 0.9)
    # Undefined correlations are None, not NaN.
    flat = ev.evaluate_metric({"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 0.5})
    assert flat.weighted_tau is flat.kendall_tau is flat.pearson is None
    assert flat.rel_at == {1: 1.0, 3: 1.0}
    one = ev.evaluate_metric({"a": 1.0, "x": 2.0}, {"a": 0.5})
    assert one.n_models == 1 and one.kendall_tau is None


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_reads_rank_json_and_multi_metric_files(tmp_path):
    rank_doc = {"models": [{"name": "a", "rank": 1, "score": 2.5, "block_scores": {}},
                           {"name": "b", "rank": 2, "score": 1.5, "block_scores": {}},
                           {"name": "c", "rank": 3, "score": 0.5, "block_scores": {}}],
                "dataset": {"root": str(tmp_path / "data" / "train")}, "settings": {}}
    multi = {"models": [
        {"name": "a", "score": 2.5, "metrics": {"ddscore": 2.5, "logme": -1.0, "leep": None}},
        {"name": "b", "score": 1.5, "metrics": {"ddscore": 1.5, "logme": -0.5,
                                                "leep": {"score": -2.0}}},
        {"name": "c", "score": 0.5, "metrics": {"ddscore": 0.5, "logme": 0.2,
                                                "leep": {"score": -1.0}}}]}
    acc = {"kind": ft.RESULTS_KIND, "models": [
        {"name": "a", "held_out_accuracy": 0.9}, {"name": "b", "held_out_accuracy": 0.7},
        {"name": "c", "held_out_accuracy": 0.8}, {"name": "z", "held_out_accuracy": 0.1}],
        "dataset": {"root": str(tmp_path / "data"),
                    "held_out": {"root": str(tmp_path / "data" / "valid")}}}
    result = ev.evaluate([_write(tmp_path / "rank.json", rank_doc),
                          _write(tmp_path / "multi.json", multi)],
                         _write(tmp_path / "acc.json", acc))
    rows = {m.metric: m for m in result.metrics}
    # The same metric from two files is told apart by the file's name.
    assert set(rows) == {"ddscore (rank)", "ddscore (multi)", "logme", "leep"}
    assert rows["leep"].n_models == 2  # "a" has no LEEP (null): left out of that metric only
    assert rows["logme"].models == ["a", "b", "c"]
    assert rows["logme"].kendall_tau == pytest.approx(
        stats.kendalltau([-1.0, -0.5, 0.2], [0.9, 0.7, 0.8]).statistic)
    assert rows["ddscore (rank)"].rel_at == {1: 1.0, 3: 1.0}
    # A plain {name: accuracy} object works too.
    plain = ev.evaluate([tmp_path / "rank.json"],
                        _write(tmp_path / "plain.json", {"a": 0.1, "b": 0.2, "c": 0.3}))
    assert plain.metrics[0].kendall_tau == pytest.approx(-1.0)

    # Scores computed on DATA (train + valid) or on valid/ would have seen the held-out images.
    for leaky in (tmp_path / "data", tmp_path / "data" / "valid"):
        doc = {**rank_doc, "dataset": {"root": str(leaky)}}
        with pytest.raises(InputError, match="held-out"):
            ev.evaluate([_write(tmp_path / "leak.json", doc)], tmp_path / "acc.json")
    with pytest.raises(InputError, match="not a scores file"):
        ev.evaluate([_write(tmp_path / "bad.json", {"models": []})], tmp_path / "acc.json")
    with pytest.raises(InputError, match="no model of metric"):
        ev.evaluate([tmp_path / "rank.json"], _write(tmp_path / "other.json", {"q": 0.5}))


# ---------------------------------------------------------------------------------------------
# The full network


def test_full_network_matches_torchvision(tmp_path):
    """Imported weights through the zoo give torchvision's logits in the fine-tuning network."""
    net = torch_resnet("resnet18", seed=3, num_classes=5)
    imported = load_checkpoint(save_pth(net, tmp_path / "r18.pth"))
    zoo.add(tmp_path / "zoo", [zoo.Addition("r18", tmp_path / "r18.pth", "pytorch", "0" * 64,
                                            imported)])
    entry = zoo.read(tmp_path / "zoo")[0]
    stored = zoo.load_model(tmp_path / "zoo", entry)
    assert stored.config.num_classes == 5
    config, state, pretrained = ft.network(stored, 5, keep_fc=True)
    assert pretrained
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(model.apply(config, state, x, logits=True)["logits"])
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    # float32 forwards with BatchNorm folded one way and applied the other: 1e-4 of the scale.
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    # A fresh head for fine-tuning: zero logits, pre-trained layer4 kept (BatchNorm folded).
    config, state, _ = ft.network(stored, 3)
    assert np.all(np.asarray(model.apply(config, state, x, logits=True)["logits"]) == 0)
    _, folded = model.fold(stored.config, stored.state_dict)
    np.testing.assert_array_equal(model.to_state_dict(state)["layer4.1.conv2.weight"],
                                  folded["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match="5 classes"):
        ft.network(stored, 3, keep_fc=True)


def test_cli_defaults_are_the_library_defaults():
    from ddscore_jax.cli import trust

    defaults = {name: p.default for name, p in inspect.signature(trust.finetune).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for field, value in ft.Settings().__dict__.items():
        assert defaults[field] == value, field


# ---------------------------------------------------------------------------------------------
# finetune and evaluate through the real command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A zoo of two ResNet18s, one converted with layer4 + fc and one backbone-only, and a
    train/valid data set (33 training images: one full batch of 32 plus one)."""
    root = tmp_path_factory.mktemp("trust")
    save_pth(torch_resnet("resnet18", 1), root / "r18_full.pth")
    zoo_dir = root / "zoo"
    assert cli("convert", root / "r18_full.pth", "--zoo", zoo_dir).returncode == 0
    backbone = model.CONFIGS["resnet18"].backbone()
    zoo.add(zoo_dir, [zoo.Addition("r18_backbone", root / "none", "demo", "1" * 64,
                                   zoo.ImportedModel(backbone,
                                                     model.init_state_dict(backbone, seed=4)))])
    data = root / "data"
    write_image_folder(data / "train", per_class=11, classes=CLASSES, seed=1)
    write_image_folder(data / "valid", per_class=5, classes=CLASSES, seed=2)
    return root, zoo_dir, data


def test_finetune_writes_resumes_and_evaluates(workspace, tmp_path):
    root, zoo_dir, data = workspace
    results = tmp_path / "results.json"
    args = ("finetune", zoo_dir, data, "--out", results, "--image-size", SIZE, "--epochs", "2")
    first = cli(*args, "--json", "-")
    assert first.returncode == 0, first.stderr
    doc = json.loads(results.read_text())
    assert json.loads(first.stdout) == doc
    assert [m["name"] for m in doc["models"]] == ["r18_full", "r18_backbone"]
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["r18_full"]["layer4"] == "pretrained"
    assert by_name["r18_backbone"]["layer4"] == "fresh"
    for m in doc["models"]:
        assert m["n_held_out"] == 15 and m["steps"] == 3  # ceil(2 epochs * 33 / 32)
        assert m["held_out_accuracy"] == m["correct"] / 15
        assert np.isfinite(m["final_train_loss"])
        assert m["settings"]["image_size"] == 32 and m["settings"]["optimizer"] == "adamw"
    assert doc["dataset"]["train"]["n_images"] == 33
    assert doc["dataset"]["held_out"]["root"] == str((data / "valid").resolve())
    assert "fresh" in first.stderr  # the table says which models had no layer4

    # Everything done: nothing is recomputed, the file is not even rewritten.
    before = results.read_bytes()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert results.read_bytes() == before

    # One model missing (an interrupted run): only that one is fine-tuned.
    doc["models"] = doc["models"][:1]
    results.write_text(json.dumps(doc))
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads(results.read_text())
    assert after["models"][0] == doc["models"][0]  # kept as it was, seconds included
    assert [m["name"] for m in after["models"]] == ["r18_full", "r18_backbone"]
    # Same seeds, same batches: the recomputed model gets the same accuracy.
    assert after["models"][1]["correct"] == by_name["r18_backbone"]["correct"]

    # Scores of DATA/train against the results: the evaluation and its figure.
    scores = tmp_path / "scores.json"
    ranked = cli("rank", zoo_dir, data / "train", "--image-size", SIZE, "--json", scores,
                 "--cache-dir", tmp_path / "cache")
    assert ranked.returncode == 0, ranked.stderr
    figure = tmp_path / "fig.png"
    evaluated = cli("evaluate", scores, results, "--figure", figure, "--json", "-")
    assert evaluated.returncode == 0, evaluated.stderr
    out = json.loads(evaluated.stdout)
    [row] = out["metrics"]
    assert row["metric"] == "ddscore" and row["n_models"] == 2
    s = [m["score"] for m in json.loads(scores.read_text())["models"]]
    a = [{m["name"]: m["held_out_accuracy"] for m in after["models"]}[m["name"]]
         for m in json.loads(scores.read_text())["models"]]
    expect = stats.kendalltau(s, a).statistic if len(set(a)) > 1 else None
    assert row["kendall_tau"] == (pytest.approx(expect) if expect is not None else None)
    assert row["rel@1"] == a[0] / max(a)
    assert "tau_w" in evaluated.stderr and "D-deepscore" in evaluated.stderr
    assert out["figure"] == str(figure)
    with Image.open(figure) as img:
        img.verify()
    with Image.open(figure) as img:
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200

    # Scores of the whole DATA include valid/: refused.
    leaky = tmp_path / "leaky.json"
    doc_scores = json.loads(scores.read_text())
    doc_scores["dataset"]["root"] = str(data.resolve())
    leaky.write_text(json.dumps(doc_scores))
    refused = cli("evaluate", leaky, results, "--no-figure")
    assert refused.returncode == 2 and "held-out" in error_line(refused)


@pytest.mark.parametrize("case,message", [
    ("no_split", "needs train/ and valid/"),
    ("bad_optimizer", "--optimizer must be one of"),
    ("bad_results", "cannot reuse as a results file"),
])
def test_finetune_bad_input_exits_2(workspace, tmp_path, case, message):
    _, zoo_dir, data = workspace
    out = tmp_path / "results.json"
    extra = []
    if case == "no_split":
        data = write_image_folder(tmp_path / "flat", per_class=2, classes=CLASSES)
    elif case == "bad_optimizer":
        extra = ["--optimizer", "lion"]
    elif case == "bad_results":
        out.write_text("{ not json")
    result = cli("finetune", zoo_dir, data, "--out", out, "--image-size", SIZE, *extra)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert line.startswith("error: ") and message in line, line
    assert "Traceback" not in result.stderr
    if case == "bad_results":
        assert out.read_text() == "{ not json"  # left as it was
    else:
        assert not out.exists()


def test_finetune_bad_input_names_the_problem(workspace, tmp_path):
    # The same InputErrors the command turns into exit 2 (above), without a process each.
    _, zoo_dir, data = workspace
    write_image_folder(tmp_path / "d" / "train", per_class=2, classes=CLASSES)
    write_image_folder(tmp_path / "d" / "valid", per_class=2, classes=("a", "b"))
    out = tmp_path / "r.json"
    with pytest.raises(InputError, match="differ from those of"):
        ft.finetune(zoo_dir, tmp_path / "d", out)
    with pytest.raises(InputError, match="no zoo here"):
        ft.finetune(tmp_path / "nozoo", data, out)
    with pytest.raises(InputError, match="folder .* does not exist"):
        ft.finetune(zoo_dir, data, tmp_path / "no" / "r.json")
    for bad in (ft.Settings(image_size=16), ft.Settings(epochs=0), ft.Settings(schedule="step"),
                ft.Settings(learning_rate=-1.0), ft.Settings(momentum=1.0),
                ft.Settings(clip_norm=-1.0)):
        with pytest.raises(InputError, match="^--"):
            ft.finetune(zoo_dir, data, out, bad)
    assert not out.exists()


def test_evaluate_bad_input_exits_2(tmp_path):
    acc = _write(tmp_path / "acc.json", {"a": 0.5, "b": 0.7})
    missing = cli("evaluate", tmp_path / "nope.json", acc)
    assert missing.returncode == 2 and "nope.json: no such file" in error_line(missing)
    only_one = cli("evaluate", acc)
    assert only_one.returncode == 2 and "at least one SCORES" in error_line(only_one)


# ---------------------------------------------------------------------------------------------
# The benchmark, as CI runs it


def test_transfer_benchmark_small_runs():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "transfer_zoo.py"),
                             "--small"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "3 models, 2 targets" in out and "tau_w" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("| metric"))
    assert header.split("|")[2:4] == [" defects ", " digits "]
    rows = [ln for ln in out.splitlines()
            if ln.startswith("| ") and not ln.startswith(("| metric", "| ---"))]
    assert any(r.startswith("| D-deepscore |") for r in rows)
    for row in rows:
        for cell in row.strip("|").split("|")[1:]:
            cell = cell.strip()
            assert cell == "n/a" or (re.fullmatch(r"[+-]\d\.\d{3}", cell)
                                     and -1.0 <= float(cell) <= 1.0), row
    # Every model was fine-tuned on every target, with an accuracy to compare against.
    assert result.stderr.count("held-out accuracy:") == 2

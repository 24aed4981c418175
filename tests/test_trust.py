"""Fine-tuning ground truth, the evaluation of rankings against it, and the transfer benchmark.

The numbers of ``evaluate`` are checked against scipy called directly and rel@k by hand; the full
network against torchvision's own forward; ``finetune`` and ``evaluate`` through the real command
in a subprocess; the benchmark's ``--small`` run as CI runs it.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, error_line, save_pth, torch_resnet, write_image_folder
from helpers import cli_in_process as invoke
from PIL import Image
from scipy import stats

from ddscore_jax import evaluation as ev
from ddscore_jax import finetuning as ft
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


# ---------------------------------------------------------------------------------------------
# evaluate: bootstrap intervals over fine-tuning seeds and over targets


def _seeded_accuracies(rng, true, seeds, noise=0.03):
    return {f"m{i}": t + rng.normal(0.0, noise, size=seeds) for i, t in enumerate(true)}


def test_replicate_statistics_are_scipys():
    # The vectorised bootstrap statistics against scipy, replicate by replicate, ties included
    # (accuracies are multiples of 1/n_held_out, so replicated means do tie).
    rng = np.random.default_rng(3)
    for m in (2, 5, 12):
        s = rng.normal(size=m)
        s[: m // 3] = np.round(s[: m // 3])
        reps = np.round(rng.uniform(0, 1, size=(40, m)) * 8) / 8
        order = np.argsort(-s, kind="stable")
        got = ev._replicate_statistics(s, reps, order, ev.REL_AT)
        for b, r in enumerate(reps):
            point = ev._point_statistics(s, r, order, ev.REL_AT)
            for key, value in point.items():
                if value is None:
                    assert np.isnan(got[key][b])
                else:  # same formulas, summation order aside
                    assert got[key][b] == pytest.approx(value, abs=1e-12), (key, m, b)


def test_bootstrap_interval_covers_the_point_and_narrows_with_more_seeds():
    rng = np.random.default_rng(11)
    true = np.linspace(0.55, 0.85, 9)
    scores = {f"m{i}": float(t + rng.normal(0.0, 0.04)) for i, t in enumerate(true)}
    widths = {}
    for seeds in (3, 12, 48):
        acc = _seeded_accuracies(np.random.default_rng(seeds), true, seeds)
        result = ev.evaluate_metric(scores, acc, "x", n_boot=2000, seed=5)
        again = ev.evaluate_metric(scores, acc, "x", n_boot=2000, seed=5)
        assert result.intervals == again.intervals  # seeded: the same numbers every run
        assert result.seeds == [seeds] * 9
        for key in ("weighted_tau", "kendall_tau", "pearson"):
            low, high = result.intervals[key]
            # Rank statistics are discrete: a point on the edge of its interval may differ in
            # the last bit from a replicate of another order with the same value.
            assert low - 1e-12 <= result.value(key) <= high + 1e-12, (key, seeds)
        widths[seeds] = {k: np.subtract(*result.intervals[k][::-1])
                         for k in ("weighted_tau", "kendall_tau", "pearson")}
    for key in widths[3]:  # more seeds, less noise in the ground truth, narrower intervals
        assert widths[3][key] > widths[12][key] > widths[48][key], key


def test_one_seed_has_no_interval_and_targets_give_one(tmp_path):
    rng = np.random.default_rng(2)
    true = np.linspace(0.5, 0.9, 6)
    groups = []
    for t in range(4):
        folder = tmp_path / f"target{t}"
        folder.mkdir()
        acc = {"models": [{"name": f"m{i}", "held_out_accuracy": float(a)}
                          for i, a in enumerate(true + rng.normal(0, 0.03, 6))],
               "dataset": {"root": str(folder)}}
        good = [{"name": f"m{i}", "score": float(a + rng.normal(0, 0.02))}
                for i, a in enumerate(true)]
        bad = [{"name": f"m{i}", "score": float(rng.normal())} for i in range(6)]
        doc = {"models": [{**g, "metrics": {"good": g["score"], "bad": b["score"]}}
                          for g, b in zip(good, bad, strict=True)],
               "settings": {"metrics": ["good", "bad"]}}
        groups += [_write(folder / "scores.json", doc), _write(folder / "acc.json", acc)]
    summary = ev.evaluate_targets(ev.group_files(groups), n_boot=500)
    assert [e.target for e in summary.targets] == [f"target{t}" for t in range(4)]
    for e in summary.targets:
        assert all(v is None for m in e.metrics for v in m.intervals.values())  # one seed
        assert e.better == []  # no spread within a target: nothing is called better
    low, high = summary.mean["good"]["weighted_tau"][1]
    taus = [m.weighted_tau for e in summary.targets for m in e.metrics if m.metric == "good"]
    assert low <= np.mean(taus) <= high and low >= min(taus) and high <= max(taus)
    assert ("good", "bad") in summary.better and ("bad", "good") not in summary.better
    assert summary.targets_resampled
    # Two targets are too few to resample (a metric ahead on both would be called better in
    # every replicate); with one seed each there is then nothing to draw an interval from.
    two = ev.evaluate_targets(ev.group_files(groups[:4]), n_boot=500)
    assert not two.targets_resampled and two.better == []
    assert all(iv is None for stats in two.mean.values() for _, iv in stats.values())
    with pytest.raises(InputError, match="at least one SCORES"):
        ev.group_files([groups[1]])
    with pytest.raises(InputError, match="at least one SCORES"):
        ev.group_files(groups[:3])


def test_test_images_are_resampled_stratified_and_paired(tmp_path):
    # Six test images, classes 0 0 0 1 1 2; one seed per model. "a" is right exactly on class 0,
    # so a stratified redraw keeps its accuracy at 3/6 in every replicate; "b" has the same
    # correctness as "a" and must get the same replicates (one draw of images for all models);
    # "c" is right on one image only, so its accuracy moves with the draw.
    labels = [0, 0, 0, 1, 1, 2]
    rows = {"a": "111000", "b": "111000", "c": "100000", "d": "111111"}
    doc = {"kind": ft.RESULTS_KIND, "version": 3,
           "dataset": {"test": {"labels": labels, "n_images": 6}},
           "models": [{"name": n, "held_out_accuracy": r.count("1") / 6,
                       "seed_accuracies": [r.count("1") / 6], "test_correct": [r]}
                      for n, r in rows.items()]}
    path = _write(tmp_path / "r.json", doc)
    correct, got_labels = ev.test_correctness(path)
    assert got_labels.tolist() == labels and correct["c"].tolist() == [[1, 0, 0, 0, 0, 0]]
    acc = {n: np.array([r.count("1") / 6]) for n, r in rows.items()}
    reps = ev.accuracy_replicates(acc, 500, 0, correct=correct, labels=got_labels)
    assert np.allclose(reps["a"], 0.5) and np.allclose(reps["d"], 1.0)
    assert np.array_equal(reps["a"], reps["b"])
    assert len(np.unique(reps["c"])) > 2 and abs(reps["c"].mean() - 1 / 6) < 0.02
    # One seed, yet an interval: the test images are resampled.
    scores = {"a": 3.0, "c": 1.0, "d": 2.0}
    result = ev.evaluate_metric(scores, acc, "x", replicates=reps, n_boot=500,
                                images_resampled=True)
    assert result.intervals["kendall_tau"] is not None
    assert ev.evaluate_metric(scores, acc, "x").intervals["kendall_tau"] is None
    # A correctness string that disagrees with the recorded accuracy: not used.
    doc["models"][0]["test_correct"] = ["111100"]
    assert ev.test_correctness(_write(tmp_path / "bad.json", doc)) is None


def test_null_distribution_of_random_rankings():
    # Three models: Kendall's tau of a uniformly random ranking is -1, -1/3, 1/3 or 1 with
    # probabilities 1/6, 2/6, 2/6, 1/6; rel@1 of a random pick averages mean(a) / max(a).
    a = [0.5, 0.7, 0.9]
    null = ev.null_replicates(a, 6000, 0)
    values, counts = np.unique(np.round(null["kendall_tau"], 6), return_counts=True)
    assert values.tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    assert counts / 6000 == pytest.approx([1 / 6, 2 / 6, 2 / 6, 1 / 6], abs=0.02)
    assert null["rel@1"].mean() == pytest.approx(np.mean(a) / 0.9, abs=0.01)
    assert np.all(null["rel@3"] == 1.0)
    # The perfect ranking: only the random rankings that are perfect too do as well.
    perfect = ev.evaluate_metric({"a": 1.0, "b": 2.0, "c": 3.0},
                                 {"a": 0.5, "b": 0.7, "c": 0.9}, "x", n_boot=6000)
    assert perfect.weighted_tau == 1.0
    assert perfect.null_p["weighted_tau"] == pytest.approx(1 / 6, abs=0.02)
    assert perfect.null["weighted_tau"]["mean"] == pytest.approx(0.0, abs=0.05)
    # Over targets: the mean of independent random rankings is narrower than one target's.
    evs = [ev.Evaluation([ev.evaluate_metric({"a": 1.0, "b": 2.0, "c": 3.0},
                                             {"a": 0.5, "b": 0.7, "c": 0.9}, "x")],
                         [], "", {}, target=f"t{i}") for i in range(4)]
    summary = ev.summarize(evs)
    one = evs[0].metrics[0].null["kendall_tau"]["interval"]
    four = summary.null["x"]["kendall_tau"]["interval"]
    assert four[1] - four[0] < one[1] - one[0]
    assert summary.null["x"]["kendall_tau"]["p"] < 0.01  # perfect on all four: rare by chance


def test_seeds_are_read_from_results(tmp_path):
    doc = {"kind": ft.RESULTS_KIND, "models": [
        {"name": "a", "held_out_accuracy": 0.8,
         "seeds": [{"seed": 0, "held_out_accuracy": 0.7}, {"seed": 1, "held_out_accuracy": 0.9}]},
        {"name": "b", "held_out_accuracy": 0.6},
        # As `finetune` writes it: "seeds" holds the seed numbers, not accuracies.
        {"name": "c", "held_out_accuracy": 0.5, "seed_accuracies": [0.4, 0.6], "seeds": [0, 1]},
        {"name": "d", "held_out_accuracy": 0.5, "seeds": [0, 1]}]}
    acc, _ = ev.read_seed_accuracies(_write(tmp_path / "r.json", doc))
    assert acc["a"].tolist() == [0.7, 0.9] and acc["b"].tolist() == [0.6]
    assert acc["c"].tolist() == [0.4, 0.6] and acc["d"].tolist() == [0.5]
    assert ev.is_accuracies_file(tmp_path / "r.json")


def test_evaluate_cli_two_targets_with_seeds(tmp_path):
    rng = np.random.default_rng(4)
    true = np.linspace(0.5, 0.9, 5)
    files = []
    for t in ("tiles", "pcb"):
        (tmp_path / t).mkdir()
        acc = {"kind": ft.RESULTS_KIND, "dataset": {"root": str(tmp_path / t)}, "models": [
            {"name": f"m{i}", "held_out_accuracy": float(a),
             "seeds": [{"seed": k, "held_out_accuracy": float(a + rng.normal(0, 0.02))}
                       for k in range(3)]} for i, a in enumerate(true)]}
        scores = {"models": [{"name": f"m{i}", "score": float(a + rng.normal(0, 0.05)),
                              "metrics": {"ddscore": float(a), "knn": float(rng.normal())}}
                             for i, a in enumerate(true)],
                  "settings": {"metrics": ["ddscore", "knn"]},
                  "dataset": {"root": str(tmp_path / t / "train")}}
        files += [_write(tmp_path / f"{t}_scores.json", scores),
                  _write(tmp_path / f"{t}_results.json", acc)]
    figures = tmp_path / "figures"
    figures.mkdir()
    run = cli("evaluate", *files, "--figure", figures, "--bootstrap", "200", "--json", "-")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["settings"] == {"bootstrap": 200, "seed": 0, "confidence": 0.95}
    assert [t["target"] for t in doc["targets"]] == ["tiles", "pcb"]
    for t in doc["targets"]:
        for m in t["metrics"]:
            low, high = m["intervals"]["weighted_tau"]
            assert low - 1e-12 <= m["weighted_tau"] <= high + 1e-12
            assert all(x["seeds"] == 3 for x in m["models"])
    mean = doc["mean_over_targets"]["ddscore"]["weighted_tau"]
    assert mean["interval"][0] <= mean["mean"] <= mean["interval"][1]
    assert "mean over 2 targets" in run.stderr  # --json - holds stdout: the tables go to stderr
    assert sorted(p.name for p in figures.iterdir()) == ["pcb.png", "tiles.png"]
    assert doc["figures"] == [str(figures / "tiles.png"), str(figures / "pcb.png")]


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
        {"name": "c", "held_out_accuracy": 0.8}],
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
    # Scores and accuracies of different models (issue 18: refused, not left out).
    with pytest.raises(InputError, match="models scored but not fine-tuned: a, b, c; models "
                                         "fine-tuned but not scored: q"):
        ev.evaluate([tmp_path / "rank.json"], _write(tmp_path / "other.json", {"q": 0.5}))


# ---------------------------------------------------------------------------------------------
# The full network


def test_finetuning_network_keeps_the_source_and_adds_what_it_lacks(tmp_path):
    """A converted checkpoint keeps every weight and BatchNorm statistic; a backbone-only one gets
    a seeded torchvision-initialised layer4 with BatchNorm; both get a zero classifier."""
    net = torch_resnet("resnet18", seed=3, num_classes=5)
    imported = load_checkpoint(save_pth(net, tmp_path / "r18.pth"))
    config, state, pretrained = ft.network(imported, 3)
    assert pretrained and config.num_classes == 3 and config.batchnorm
    sd = model.to_state_dict(state)
    for key, value in imported.state_dict.items():
        if not key.startswith("fc."):
            np.testing.assert_array_equal(sd[key], value, err_msg=key)
    assert not sd["fc.weight"].any() and not sd["fc.bias"].any()

    backbone = model.ImportedModel(imported.config.backbone(),
                                 {k: v for k, v in imported.state_dict.items()
                                  if not k.startswith(("layer4.", "fc."))})
    config, state, pretrained = ft.network(backbone, 3, seed=7)
    assert not pretrained and config.depths == (2, 2, 2, 2)
    fresh = model.to_state_dict(state)
    np.testing.assert_array_equal(fresh["layer3.1.conv2.weight"],
                                  imported.state_dict["layer3.1.conv2.weight"])
    w = fresh["layer4.0.conv1.weight"]  # Kaiming normal, fan_out: std sqrt(2 / (512 * 9))
    assert abs(w.std() / np.sqrt(2 / (512 * 9)) - 1) < 0.05
    assert np.all(fresh["layer4.1.bn2.weight"] == 1)
    assert np.all(fresh["layer4.1.bn2.running_var"] == 1)
    again = model.to_state_dict(ft.network(backbone, 3, seed=7)[1])
    assert all(np.array_equal(again[k], fresh[k]) for k in fresh)  # seeded
    other = model.to_state_dict(ft.network(backbone, 3, seed=8)[1])
    assert not np.array_equal(other["layer4.0.conv1.weight"], w)


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
                                   model.ImportedModel(backbone,
                                                     model.init_state_dict(backbone, 4)))])
    data = root / "data"
    write_image_folder(data / "train", per_class=11, classes=CLASSES, seed=1)
    write_image_folder(data / "valid", per_class=5, classes=CLASSES, seed=2)
    return root, zoo_dir, data


def test_finetune_writes_resumes_and_evaluates(workspace, tmp_path):
    root, zoo_dir, data = workspace
    results = tmp_path / "results.json"
    args = ("finetune", zoo_dir, data, "--out", results, "--image-size", SIZE, "--epochs", "2",
            "--learning-rate", "1e-3", "--learning-rate", "1e-4")
    first = cli(*args, "--json", "-")
    assert first.returncode == 0, first.stderr
    doc = json.loads(results.read_text())
    assert json.loads(first.stdout) == doc
    assert [m["name"] for m in doc["models"]] == ["r18_full", "r18_backbone"]
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["r18_full"]["layer4"] == "pretrained"
    assert by_name["r18_backbone"]["layer4"] == "fresh"
    # No test/: valid/ (5 per class) is halved, 2 per class select and 3 test.
    assert doc["dataset"]["selection"]["n_images"] == 6
    for m in doc["models"]:
        assert m["n_held_out"] == 9 and m["steps"] == 3  # ceil(2 epochs * 33 / 32)
        assert m["held_out_accuracy"] == np.mean(m["correct"]) / 9
        assert m["best_learning_rate"] in (1e-3, 1e-4) and len(m["seed_accuracies"]) == 1
        assert set(m["accuracy_by_learning_rate"]) == {"0.001", "0.0001"}
        assert np.isfinite(m["final_train_loss"])
        assert m["settings"]["image_size"] == 32 and m["settings"]["optimizer"] == "adamw"
    assert doc["dataset"]["train"]["n_images"] == 33
    assert doc["dataset"]["held_out"]["root"] == str((data / "valid").resolve())
    assert "fresh" in first.stderr  # the table (on stderr: --json -) says which had no layer4

    # Everything done: nothing is recomputed, the file is not even rewritten.
    before = results.read_bytes()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert results.read_bytes() == before

    # The last run missing (an interrupted run): only that one is fine-tuned.
    assert len(doc["runs"]) == 4  # 2 models x 2 learning rates x 1 seed
    doc["runs"] = doc["runs"][:3]
    doc["models"] = doc["models"][:1]
    results.write_text(json.dumps(doc))
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads(results.read_text())
    assert after["models"][0] == doc["models"][0]  # kept as it was, seconds included
    assert after["runs"][:3] == doc["runs"]  # and its runs not repeated
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
    assert "tau_w" in evaluated.stderr and "D-deepscore" in evaluated.stderr  # --json -
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
    refused = invoke("evaluate", leaky, results, "--no-figure")
    assert refused.returncode == 2 and "held-out" in error_line(refused)


class _Interrupt(Exception):
    pass


def test_grid_and_seeds_are_recorded_and_resume_without_repeating(workspace, tmp_path):
    """Every (model, learning rate, seed) is one run, recorded as it finishes; an interrupted
    call resumes with the runs it lacks, and a wider grid or more seeds reuse the runs done."""
    _, zoo_dir, data = workspace
    results = tmp_path / "r.json"
    settings = ft.Settings(image_size=32, epochs=1, learning_rates=(1e-3, 1e-4), seeds=2, seed=5)
    started: list[str] = []

    def interrupt_third(description: str, done: int, total: int) -> None:
        if description.startswith("fine-tuning") and description not in started:
            started.append(description)
            if len(started) == 3:  # a step into the third run
                raise _Interrupt

    with pytest.raises(_Interrupt):
        ft.finetune(zoo_dir, data, results, settings, progress=interrupt_third)
    doc = json.loads(results.read_text())
    assert [(r["name"], r["learning_rate"], r["seed"]) for r in doc["runs"]] == [
        ("r18_full", 1e-3, 5), ("r18_full", 1e-3, 6)]
    assert doc["models"] == []  # no model has its whole grid yet

    trained: list[str] = []
    ft.finetune(zoo_dir, data, results, settings,
                progress=lambda d, i, t: trained.append(d) if d.startswith("fine-tuning") and
                i == 1 else None)
    assert len(trained) == 6  # 8 runs, 2 done before
    assert not any("lr 0.001, seed 5" in d and "r18_full" in d for d in trained)
    doc = json.loads(results.read_text())
    assert len(doc["runs"]) == 8
    for m in doc["models"]:
        runs = {(r["learning_rate"], r["seed"]): r["held_out_accuracy"] for r in doc["runs"]
                if r["name"] == m["name"]}
        chose = {(r["learning_rate"], r["seed"]): r["selection_accuracy"] for r in doc["runs"]
                 if r["name"] == m["name"]}
        means = {lr: (runs[lr, 5] + runs[lr, 6]) / 2 for lr in (1e-3, 1e-4)}
        select = {lr: (chose[lr, 5] + chose[lr, 6]) / 2 for lr in (1e-3, 1e-4)}
        best = m["best_learning_rate"]
        assert select[best] == max(select.values()) == m["selection_accuracy"]
        assert means[best] == m["held_out_accuracy"]
        assert m["seed_accuracies"] == [runs[best, 5], runs[best, 6]] and m["seeds"] == [5, 6]
        assert m["held_out_accuracy_sd"] == pytest.approx(np.std(m["seed_accuracies"], ddof=1))
    assert {m["name"]: m["layer4"] for m in doc["models"]} == {"r18_full": "pretrained",
                                                               "r18_backbone": "fresh"}

    # A third seed: only its runs are new.
    trained.clear()
    more = ft.Settings(**{**settings.__dict__, "seeds": 3})
    ft.finetune(zoo_dir, data, results, more,
                progress=lambda d, i, t: trained.append(d) if d.startswith("fine-tuning") and
                i == 1 else None)
    assert len(trained) == 4 and all("seed 7" in d for d in trained)
    assert all(len(m["seed_accuracies"]) == 3 for m in json.loads(results.read_text())["models"])


def _run(lr: float, seed: int, select: float, test: float, n: int = 10) -> dict:
    right = round(test * n)
    return {"learning_rate": lr, "seed": seed, "selection_accuracy": select,
            "held_out_accuracy": test, "n_held_out": n, "correct": right,
            "test_correct": "1" * right + "0" * (n - right), "final_train_loss": 0.1,
            "layer4": "pretrained", "batchnorm": True, "steps": 1, "seconds": 1.0,
            "train_fingerprint": "t", "held_out_fingerprint": "h"}


def test_the_rate_is_chosen_on_the_selection_split_alone():
    # 1e-3 is best on the selection split, 1e-4 on the test split: the choice follows selection,
    # and the accuracy reported is the test accuracy at the chosen rate (not the best test one).
    entry = zoo.ZooEntry("m", "resnet18", model.CONFIGS["resnet18"], "s", "f", "0" * 64, "c")
    runs = [_run(1e-3, 0, 0.9, 0.5), _run(1e-3, 1, 0.8, 0.6),
            _run(1e-4, 0, 0.6, 0.9), _run(1e-4, 1, 0.7, 1.0)]
    m = ft.summarise(entry, runs, ft.Settings(learning_rates=(1e-3, 1e-4), seeds=2))
    assert m["best_learning_rate"] == 1e-3 and m["selected_on"] == "selection"
    assert m["selection_accuracy"] == pytest.approx(0.85)
    assert m["held_out_accuracy"] == pytest.approx(0.55) and m["seed_accuracies"] == [0.5, 0.6]
    assert m["accuracy_by_learning_rate"]["0.0001"] == pytest.approx(0.95)  # recorded, unused
    assert m["test_correct"] == ["1" * 5 + "0" * 5, "1" * 6 + "0" * 4]
    # Swap the selection accuracies and the choice follows them, whatever the test says.
    for r in runs:
        r["selection_accuracy"] = 1.5 - r["selection_accuracy"]
    assert ft.summarise(entry, runs, ft.Settings(learning_rates=(1e-3, 1e-4),
                                                 seeds=2))["best_learning_rate"] == 1e-4


def test_splits_train_valid_test_and_halved_valid(tmp_path):
    for part, n in (("train", 3), ("valid", 5), ("test", 4)):
        write_image_folder(tmp_path / "three" / part, per_class=n, classes=("a", "b"))
    split = ft.scan_split(tmp_path / "three")
    assert (len(split.selection), len(split.test)) == (10, 8)
    assert split.test.root == tmp_path / "three" / "test"
    # Two splits: valid/ halved per class, disjoint, the same cut whatever the training seed.
    shutil.rmtree(tmp_path / "three" / "test")
    split = ft.scan_split(tmp_path / "three")
    chosen, tested = set(split.selection.paths), set(split.test.paths)
    assert (len(chosen), len(tested)) == (4, 6) and not chosen & tested
    assert [int((split.selection.labels == c).sum()) for c in (0, 1)] == [2, 2]
    assert ft.scan_split(tmp_path / "three").selection.paths == split.selection.paths
    # One rate: nothing is chosen, all of valid/ tests.
    split = ft.scan_split(tmp_path / "three", choose=False)
    assert split.selection is None and len(split.test) == 10


@pytest.mark.parametrize("case,message", [
    ("no_split", "needs train/ and valid/"),
    ("bad_optimizer", "'lion' is not one of 'sgd', 'adamw'"),  # a listed choice: Click refuses
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
    result = invoke("finetune", zoo_dir, data, "--out", out, "--image-size", SIZE, *extra)
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
    for bad in (ft.Settings(image_size=16), ft.Settings(image_size=5000), ft.Settings(epochs=0),
                ft.Settings(schedule="step"), ft.Settings(learning_rates=(-1.0,)),
                ft.Settings(seeds=0),
                ft.Settings(momentum=1.0),
                ft.Settings(clip_norm=-1.0)):
        with pytest.raises(InputError, match="^--"):
            ft.finetune(zoo_dir, data, out, bad)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["unreadable", "missing", "wrong_classes"])
def test_a_bad_checkpoint_gets_the_same_line_from_rank_leep_and_finetune(workspace, tmp_path,
                                                                         damage):
    """Both load the source network through the zoo's one loader, so a checkpoint that cannot be
    used is the same exit 2 and the same line naming it, whichever command meets it."""
    import shutil

    _, zoo_src, data = workspace
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(zoo_src, zoo_dir)
    doc = json.loads((zoo_dir / "zoo.json").read_text())
    full = next(m for m in doc["models"] if m["name"] == "r18_full")
    checkpoint = zoo_dir / full["checkpoint"]
    if damage == "unreadable":
        for f in checkpoint.rglob("*"):
            if f.is_file():
                f.write_bytes(b"not a checkpoint")
    elif damage == "missing":
        shutil.rmtree(checkpoint)
    else:  # zoo.json says 10 classes; the checkpoint's classifier has another number
        full["config"]["num_classes"] = 10
        (zoo_dir / "zoo.json").write_text(json.dumps(doc))
    ranked = invoke("rank", zoo_dir, data / "train", "--metric", "leep", "--image-size", SIZE,
                    "--no-cache")
    tuned = invoke("finetune", zoo_dir, data, "--out", tmp_path / "r.json", "--image-size", SIZE)
    assert ranked.returncode == tuned.returncode == 2, (ranked.stderr, tuned.stderr)
    line = error_line(ranked)
    assert line == error_line(tuned) and str(checkpoint.resolve()) in line, (line, tuned.stderr)
    assert "Traceback" not in ranked.stderr + tuned.stderr
    assert not (tmp_path / "r.json").exists()


def test_evaluate_bad_input_exits_2(tmp_path):
    acc = _write(tmp_path / "acc.json", {"a": 0.5, "b": 0.7})
    missing = invoke("evaluate", tmp_path / "nope.json", acc)
    assert missing.returncode == 2 and "nope.json: no such file" in error_line(missing)
    only_one = invoke("evaluate", acc)
    assert only_one.returncode == 2 and "at least one SCORES" in error_line(only_one)


# ---------------------------------------------------------------------------------------------
# The benchmark, as CI runs it


@pytest.mark.slow  # pre-trains and fine-tunes a small zoo on two targets: minutes on 2 cores
def test_transfer_benchmark_small_runs():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "transfer_zoo.py"),
                             "--small"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "3 models, 2 targets" in out and "tau_w" in out
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| metric"))
    assert lines[start].split("|")[2:4] == [" defects ", " digits "]
    end = next(i for i in range(start, len(lines) + 1)
               if i == len(lines) or not lines[i].startswith("|"))
    rows = lines[start + 2:end]  # the tau_w table (the accuracies and fixed-rate ones follow)
    assert "fine-tuned test accuracy" in out and "*random ranking (null)*" in out
    assert any(r.startswith("| D-deepscore |") for r in rows)
    for row in rows:
        for cell in row.strip("|").split("|")[1:]:
            cell = cell.strip()
            # tau_w, with its 95% interval where there is one (the mean over targets).
            match = re.fullmatch(r"([+-]\d\.\d{3})( \[[+-]\d\.\d\d, [+-]\d\.\d\d\])?", cell)
            assert cell == "n/a" or (match and -1.0 <= float(match.group(1)) <= 1.0), row
    # Every model was fine-tuned on every target, with an accuracy to compare against.
    assert result.stderr.count("held-out accuracy:") == 2


@pytest.mark.slow  # the same benchmark on folders: minutes on 2 cores
def test_transfer_benchmark_on_folders(tmp_path):
    # Two tiny folders of classes as sources and as targets, beside the packaged sources (few
    # steps): each target is split with a seed, scored on train/ only, and ranks a zoo without
    # the model pre-trained on its own images.
    folders = {name: write_image_folder(tmp_path / name, per_class=6, seed=k, size=(24, 24))
               for k, name in enumerate(("alpha", "beta"))}
    (tmp_path / "alpha" / "crack" / "notes.txt").write_text("not an image")
    out = tmp_path / "bench"
    args = [sys.executable, str(REPO / "benchmarks" / "transfer_zoo.py"), "--small",
            "--pretrain-steps", "2", "--epochs", "1", "--train-per-class", "3",
            "--valid-per-class", "2", "--out", str(out), "--json", str(tmp_path / "r.json")]
    for name, folder in folders.items():
        args += ["--source", f"{name}={folder}", "--target", f"{name}={folder}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 models, 2 targets" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    for name in folders:
        target = report["targets"][name]
        assert target["excluded"] == [f"resnet18_{name}"]
        assert sorted(target["accuracy"]) == sorted(
            m for m in report["models"] if m != f"resnet18_{name}")
        assert (target["n_train"], target["n_held_out"]) == (9, 6)  # 3 classes x (3 + 2)
        train = {p.name for p in (out / "targets" / name / "train").rglob("*.png")}
        valid = {p.name for p in (out / "targets" / name / "valid").rglob("*.png")}
        assert len(train) == 9 and len(valid) == 6 and not train & valid
        scored = json.loads((out / "scores" / f"{name}.json").read_text())
        assert scored["dataset"]["root"] == str((out / "targets" / name / "train").resolve())
        assert (out / "figures" / f"{name}.png").is_file()
    assert set(report["mean_over_targets"]) >= {"ddscore", "logme"}
    for name in folders:  # one learning rate in --small: its tau_w is the selected one's
        fixed = report["targets"][name]["weighted_tau_at_fixed_rate"]
        assert list(fixed) == ["0.001"]
        chosen = {e["metric"]: e["weighted_tau"] for e in report["targets"][name]["metrics"]}
        assert {m: v and v[0] for m, v in fixed["0.001"].items()} == chosen
    # Evaluated again from the run's folder, without training: the same numbers.
    again = subprocess.run([*args[:2], "--evaluate-only", str(tmp_path / "r.json"), "--out",
                            str(out), "--json", str(tmp_path / "again.json")],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    redone = json.loads((tmp_path / "again.json").read_text())
    assert redone["targets"] == report["targets"]
    assert redone["mean_over_targets"] == report["mean_over_targets"]
    bad = subprocess.run([*args[:2], "--source", f"x={tmp_path / 'missing'}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "is not a folder" in bad.stderr


@pytest.mark.parametrize("text,why", [("{bad", "Expecting property name"),
                                      ("{}", "not a report of this benchmark"),
                                      (None, "No such file")])
def test_transfer_benchmark_evaluate_only_refuses_a_bad_report(tmp_path, text, why):
    report = tmp_path / "report.json"
    if text is not None:
        report.write_text(text)
    (tmp_path / "run" / "results").mkdir(parents=True)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "transfer_zoo.py"),
                             "--evaluate-only", str(report), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert str(report) in result.stderr and why in result.stderr
    if text is not None:
        assert report.read_text() == text  # not rewritten

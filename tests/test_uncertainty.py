"""A ranking's uncertainty through the real API (and converter, for the zoo): ties, a clear winner,
repeatability, intervals that narrow with more images, points unchanged, CSV/pandas/HTML."""

import csv
import json

import numpy as np
import pytest
from helpers import cli, save_pth, torch_resnet, write_image_folder

import ddscore_jax
from ddscore_jax import api, cache, data


def write_features(folder, models: dict[str, np.ndarray], labels: np.ndarray):
    """Feature files as `extract` writes them (docs/interface.md), one per model; both blocks
    get the same matrix plus a little independent noise."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = np.array([f"c{c}" for c in range(labels.max() + 1)])
    paths = np.array([f"{classes[y]}/img_{i:04d}.png" for i, y in enumerate(labels)])
    rng = np.random.default_rng(99)
    dataset = data.Dataset(folder, tuple(paths), labels.astype(np.int64), tuple(classes))
    for name, f in models.items():
        # With the record extract writes (cache.feature_settings), made up: no zoo, no images.
        made_from = {"version": cache.FEATURES_VERSION, "model_sha256": name,
                     "checkpoint": name, "data": "made-up", "image_size": 32,
                     "dtype": "float32", "engine": "jax"}
        cache.write_features(folder / f"{name}.npz",
                             {"layer3.0": f.astype(np.float32),
                              "layer3.1": (f + 0.01 * rng.random(f.shape)).astype(np.float32)},
                             dataset, made_from)
    return folder


def target(n: int, d: int = 16, classes: int = 3, seed: int = 0):
    """A clearly separating model ("good": class centres far apart) and random ones."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = 4.0 * rng.random((classes, d))
    good = np.abs(centres[y] + 0.3 * rng.normal(size=(n, d)))
    randoms = {f"random{k}": np.abs(rng.normal(size=(n, d))) + 1.0 for k in range(3)}
    return y, {"good": good, **randoms}


def test_a_model_that_separates_the_classes_wins_with_p_best_near_one(tmp_path):
    y, models = target(90)
    ranking = api.score(write_features(tmp_path / "f", models, y), resamples=200,
                        metrics=["ddscore", "hscore", "gbc", "knn"])
    best = ranking.best
    assert best.name == "good"
    for metric in ("ddscore", "hscore", "gbc", "knn"):
        assert best.uncertainty[metric].p_best > 0.98, metric
        assert best.uncertainty[metric].rank_interval == (1, 1)
        assert ranking.leader_group(metric) == ["good"]
    assert best.p_best == best.uncertainty["ddscore"].p_best
    others = ranking.models[1:]
    assert sum(m.p_best for m in ranking.models) == pytest.approx(1.0)
    assert all(not m.tied_with_best for m in others)
    # The random models cannot be told apart from one another: their rank intervals overlap.
    assert all(m.rank_interval[0] <= 3 and m.rank_interval[1] >= 3 for m in others)


def test_same_seed_repeats_bit_for_bit_and_another_seed_differs(tmp_path):
    y, models = target(60)
    folder = write_features(tmp_path / "f", models, y)
    a = api.score(folder, resamples=100, seed=3).to_json()
    b = api.score(folder, resamples=100, seed=3).to_json()
    assert json.dumps(a) == json.dumps(b)
    c = api.score(folder, resamples=100, seed=4).to_json()
    assert [m["interval"] for m in a["models"]] != [m["interval"] for m in c["models"]]
    assert a["settings"]["resamples"] == 100 and a["settings"]["confidence"] == 0.95


def test_intervals_narrow_as_the_target_set_grows(tmp_path):
    widths = []
    for n in (60, 600):
        y, models = target(n, seed=1)
        ranking = api.score(write_features(tmp_path / str(n), models, y), resamples=200)
        widths.append({m.name: m.interval[1] - m.interval[0] for m in ranking.models})
    for name in widths[0]:
        # ~ 1 / sqrt(n): ten times the images, about a third of the width.
        assert widths[1][name] < 0.6 * widths[0][name], name


def test_point_scores_are_the_same_with_and_without_resampling(tmp_path):
    y, models = target(48)
    folder = write_features(tmp_path / "f", models, y)
    off = api.score(folder, resamples=0, metrics=["ddscore", "logme"])
    on = api.score(folder, resamples=50, metrics=["ddscore", "logme"])
    strip = ("interval", "rank_interval", "p_best", "tied_with_best", "uncertainty")
    j_off, j_on = off.to_json(), on.to_json()
    for a, b in zip(j_off["models"], j_on["models"], strict=True):
        assert {k: v for k, v in a.items() if k not in strip} == \
            {k: v for k, v in b.items() if k not in strip}
        assert a["interval"] is None and a["p_best"] is None and a["uncertainty"] == {}
        assert set(b["uncertainty"]) == {"ddscore", "logme"}
    assert off.leader_group() == [off.best.name]
    assert j_off["settings"]["resamples"] == 0


def test_csv_round_trips_through_the_csv_module(tmp_path):
    y, models = target(48)
    ranking = api.score(write_features(tmp_path / "f", models, y), resamples=50,
                        metrics=["ddscore", "gbc"])
    path = tmp_path / "ranking.csv"
    ranking.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    blocks = ["layer3.0", "layer3.1"]
    per_metric = ["", "_lo", "_hi", "_rank_lo", "_rank_hi", "_p_best", "_tied_with_best"]
    assert list(rows[0]) == ["rank", "name", *[m + s for m in ("ddscore", "gbc")
                                              for s in per_metric], *blocks]
    for row, m in zip(rows, ranking.models, strict=True):
        assert float(row["ddscore"]) == m.score and float(row["gbc"]) == m.metrics["gbc"]
        u = m.uncertainty["gbc"]
        assert (float(row["gbc_lo"]), float(row["gbc_hi"])) == u.interval
        assert (int(row["gbc_rank_lo"]), int(row["gbc_rank_hi"])) == u.rank_interval
        assert float(row["gbc_p_best"]) == u.p_best
        assert row["gbc_tied_with_best"] == str(u.tied_with_best)
        assert [float(row[b]) for b in blocks] == [m.block_scores[b] for b in blocks]
    frame = ranking.to_pandas()
    assert list(frame.index) == [m.name for m in ranking.models]
    assert frame.loc[ranking.best.name, "ddscore_p_best"] == ranking.best.p_best
    html = ranking._repr_html_()
    assert html.count("<tr>") == len(ranking.models) + 1 and "P(best)" in html
    # Without resampling the interval cells are empty, not "None".
    ranking0 = api.score(tmp_path / "f", resamples=0)
    ranking0.to_csv(path)
    with open(path, newline="") as f:
        row = next(csv.DictReader(f))
    assert row["ddscore_lo"] == "" and row["ddscore_tied_with_best"] == ""


def test_progress_callback_hears_the_resampling(tmp_path):
    y, models = target(30)
    heard = []
    api.score(write_features(tmp_path / "f", models, y), resamples=20,
              progress=lambda *a: heard.append(a))
    assert any(d.startswith("resampling ddscore: 20 replicates") and c == t
               for d, c, t in heard)
    api.score(tmp_path / "f", resamples=20, progress=True)  # bars on stderr, no error


def test_too_few_resamples_is_refused_in_one_line(tmp_path):
    y, models = target(30)
    with pytest.raises(ddscore_jax.errors.InputError, match="--resamples must be 0"):
        api.score(write_features(tmp_path / "f", models, y), resamples=5)


@pytest.fixture(scope="module")
def twin_zoo(tmp_path_factory):
    """One checkpoint converted under two names, beside another model, and a data set."""
    root = tmp_path_factory.mktemp("twins")
    ckpts = root / "ckpts"
    ckpts.mkdir()
    net = torch_resnet("resnet18", 7)
    save_pth(net, ckpts / "twin_a.pth")
    save_pth(net, ckpts / "twin_b.pth")
    data = write_image_folder(root / "data", per_class={"crack": 10, "ok": 10, "scratch": 10})
    zoo = root / "zoo"
    done = cli("convert", ckpts, "--zoo", zoo)
    assert done.returncode == 0, done.stderr
    return root, zoo, data


def test_one_checkpoint_under_two_names_is_reported_tied(twin_zoo):
    root, zoo, data = twin_zoo
    ranking = api.rank(zoo, data, image_size=32, batch_size=16, resamples=200,
                       cache_dir=root / "cache", metrics=["ddscore", "leep"])
    a, b = ranking.models
    assert {a.name, b.name} == {"twin_a", "twin_b"}
    for metric in ("ddscore", "leep"):
        ua, ub = a.uncertainty[metric], b.uncertainty[metric]
        assert ua == ub
        assert ua.p_best == 0.5 and 0.0 < ua.p_best < 1.0
        assert ua.tied_with_best and ub.tied_with_best and ua.rank_interval == (1, 1)
        assert sorted(ranking.leader_group(metric)) == ["twin_a", "twin_b"]
        assert ua.interval[0] < a.metrics[metric] < ua.interval[1]


def test_a_biased_metric_gets_an_interval_around_its_point_score(tmp_path):
    # Noise features, d close to the distinct images of a replicate: the H-score (a fit of the
    # labels in d dimensions) is higher on every replicate than on the sample itself, so an
    # uncentred percentile interval would lie wholly above the point score.
    rng = np.random.default_rng(3)
    y = np.arange(60) % 3
    models = {f"noise{k}": rng.normal(size=(60, 16)) for k in range(2)}
    ranking = api.score(write_features(tmp_path / "f", models, y), resamples=100,
                        metrics=["hscore"])
    for m in ranking.models:
        assert m.interval[0] < m.score < m.interval[1]

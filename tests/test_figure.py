"""``rank --figure``: the file opens with Pillow and has the expected panels, in every format."""

import numpy as np
import pytest
from helpers import cli_in_process as invoke
from helpers import error_line
from PIL import Image
from test_uncertainty import target, twin_zoo, write_features  # noqa: F401  (a fixture)

from ddscore_jax import api, figure

BLUE = np.array([31, 119, 180])  # matplotlib's tab:blue: the leader's group


def has_colour(path, rgb) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    return bool((np.abs(pixels - rgb).sum(axis=1) < 10).any())


def test_one_panel_per_metric_and_the_tau_matrix(tmp_path):
    y, models = target(60)
    feats = write_features(tmp_path / "f", models, y)
    several = api.score(feats, resamples=50, metrics=["ddscore", "hscore", "knn"])
    png = figure.plot_ranking(several, tmp_path / "r.png", title="three metrics")
    image = Image.open(png)
    image.verify()
    rows, cols, size = figure.layout(4, len(models))
    assert (rows, cols) == (2, 3)
    assert Image.open(png).size == (round(size[0] * figure.DPI), round(size[1] * figure.DPI))
    assert Image.open(png).info["Description"] == \
        "panels: ddscore; hscore; knn; Kendall tau"
    assert has_colour(png, BLUE)  # the leader's group is drawn
    one = api.score(feats, resamples=50)
    png1 = figure.plot_ranking(one, tmp_path / "one.png")
    assert Image.open(png1).info["Description"] == "panels: ddscore"
    _, _, size1 = figure.layout(1, len(models))
    assert Image.open(png1).size == (round(size1[0] * figure.DPI), round(size1[1] * figure.DPI))
    svg = figure.plot_ranking(several, tmp_path / "r.svg").read_text()
    assert svg.count("Kendall tau") >= 1 and "H-score" in svg
    assert figure.plot_ranking(several, tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
    tau = figure.kendall_matrix(several, ["ddscore", "hscore", "knn"])
    assert np.allclose(np.diag(tau), 1) and np.allclose(tau, tau.T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "one.png", "r.pdf", "r.png",
                                                          "r.svg"]  # no temporaries left


def test_rank_figure_through_the_cli(twin_zoo, tmp_path):  # noqa: F811
    root, zoo, data = twin_zoo
    png = tmp_path / "ranking.png"
    done = invoke("rank", zoo, data, "--image-size", "32", "--metric", "ddscore,leep",
                  "--figure", png, "--cache-dir", root / "cache")
    assert done.returncode == 0, done.stderr
    assert Image.open(png).info["Description"] == "panels: ddscore; leep; Kendall tau"
    assert has_colour(png, BLUE)


@pytest.mark.parametrize("name,message", [("r.gif", "--figure must end in .png, .svg, .pdf"),
                                          ("missing/r.png", "does not exist")])
def test_a_bad_figure_path_is_refused_before_any_work(twin_zoo, tmp_path, name, message):  # noqa: F811
    _, zoo, data = twin_zoo
    cache = tmp_path / "cache"
    refused = invoke("rank", zoo, data, "--image-size", "32", "--figure", tmp_path / name,
                     "--cache-dir", cache)
    assert refused.returncode == 2 and message in error_line(refused), refused.stderr
    assert not cache.exists()

"""``finetune --models`` and ``--top K --ranking FILE``: exactly the intended models are fine-tuned,
and a bad choice is refused in one line (exit 2) before any work. Real command, real files."""

import json

import pytest
from helpers import cli, error_line, save_pth, torch_resnet, write_image_folder
from helpers import cli_in_process as invoke

from ddscore_jax import shortlist

SIZE = "32"
CLASSES = ("crack", "ok")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Three ResNet18s (two of them one checkpoint under two names) and a train/valid set."""
    root = tmp_path_factory.mktemp("shortlist")
    ckpts = root / "ckpts"
    ckpts.mkdir()
    twin = torch_resnet("resnet18", 4)
    save_pth(twin, ckpts / "twin_a.pth")
    save_pth(twin, ckpts / "twin_b.pth")
    save_pth(torch_resnet("resnet18", 5), ckpts / "other.pth")
    zoo_dir = root / "zoo"
    done = cli("convert", ckpts, "--zoo", zoo_dir)
    assert done.returncode == 0, done.stderr
    data = root / "data"
    write_image_folder(data / "train", per_class=6, classes=CLASSES, seed=1)
    write_image_folder(data / "valid", per_class=2, classes=CLASSES, seed=2)
    return root, zoo_dir, data


def finetuned(results) -> list[str]:
    return sorted({r["name"] for r in json.loads(results.read_text())["runs"]})


FAST = ("--image-size", SIZE, "--epochs", "1", "--learning-rate", "1e-3", "--batch-size", "8")


def test_models_fine_tunes_only_the_named_ones(workspace, tmp_path):
    _, zoo_dir, data = workspace
    results = tmp_path / "r.json"
    done = invoke("finetune", zoo_dir, data, "--out", results, "--models", "other,twin_b", *FAST)
    assert done.returncode == 0, done.stderr
    assert finetuned(results) == ["other", "twin_b"]


def test_top_one_fine_tunes_the_leaders_group_of_a_real_ranking(workspace, tmp_path):
    root, zoo_dir, data = workspace
    ranking = tmp_path / "ranking.json"
    ranked = invoke("rank", zoo_dir, data / "train", "--image-size", SIZE, "--json", ranking,
                    "--cache-dir", root / "cache")
    assert ranked.returncode == 0, ranked.stderr
    doc = json.loads(ranking.read_text())
    group = [m["name"] for m in doc["models"] if m["tied_with_best"]]
    # The twins are one checkpoint: whichever leads, its twin is in its group.
    assert ("twin_a" in group) == ("twin_b" in group)
    results = tmp_path / "r.json"
    done = invoke("finetune", zoo_dir, data, "--out", results, "--top", "1", "--ranking",
                  ranking, *FAST)
    assert done.returncode == 0, done.stderr
    assert finetuned(results) == sorted(group)


def test_top_k_rule():
    def m(name, rank, lo, tied):
        return {"name": name, "rank": rank, "rank_interval": [lo, lo + 2],
                "tied_with_best": tied}

    doc = {"models": [m("a", 1, 1, True), m("b", 2, 1, True), m("c", 3, 2, False),
                      m("d", 4, 3, False), m("e", 5, 4, False)]}
    assert shortlist.top(doc, 1) == ["a", "b"]
    assert shortlist.top(doc, 2) == ["a", "b", "c"]  # c's rank interval reaches rank 2
    assert shortlist.top(doc, 3) == ["a", "b", "c", "d"]
    # Without intervals (--resamples 0): the K best alone.
    plain = {"models": [{"name": n, "rank": i + 1, "rank_interval": None, "tied_with_best": None}
                        for i, n in enumerate("xyz")]}
    assert shortlist.top(plain, 1) == ["x"] and shortlist.top(plain, 2) == ["x", "y"]


@pytest.mark.parametrize("extra,message", [
    (("--models", "twin_a,nobody"), "no model named nobody in this zoo"),
    (("--models", "twin_a", "--top", "1", "--ranking", "R"), "choose the models two ways"),
    (("--top", "1"), "--top K and --ranking FILE go together"),
    (("--top", "1", "--ranking", "FOREIGN"), "a ranking of another zoo (stranger not in"),
    (("--top", "1", "--ranking", "CHANGED"), "twin_a has another checkpoint in"),
    (("--top", "0", "--ranking", "R"), "--top must be at least 1, got 0"),
    (("--top", "1", "--ranking", "BROKEN"), "not a ranking JSON file"),
])
def test_a_bad_choice_is_refused_in_one_line(workspace, tmp_path, extra, message):
    _, zoo_dir, data = workspace
    files = {
        "R": {"models": [{"name": "twin_a", "rank": 1}]},
        "FOREIGN": {"models": [{"name": "stranger", "rank": 1, "tied_with_best": True}]},
        "CHANGED": {"models": [{"name": "twin_a", "rank": 1}],
                    "zoo": {"root": "elsewhere", "sha256": {"twin_a": "0" * 64}}},
    }
    args = []
    for a in extra:
        if a in files:
            (tmp_path / a).write_text(json.dumps(files[a]))
            a = tmp_path / a
        elif a == "BROKEN":
            (tmp_path / a).write_text("{not json")
            a = tmp_path / a
        args.append(a)
    results = tmp_path / "r.json"
    refused = invoke("finetune", zoo_dir, data, "--out", results, *args, *FAST)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert message in error_line(refused), error_line(refused)
    assert not results.exists()

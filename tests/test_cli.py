"""The real ``ddscore-jax`` command on real files in a temporary folder.

Two tiers: end-to-end runs in a subprocess, as a user runs it (``cli``), and argument, usage and
bad-input tests in this process through Typer's ``CliRunner`` and the real entry point
(``invoke``), which check the same exit codes and lines without starting Python and JAX again.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import cli, error_line, save_pth, torch_resnet, write_image_folder
from helpers import cli_in_process as invoke

from ddscore_jax import api

SIZE = "32"  # small images keep the subprocess runs fast; parity is tested in test_model.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Three checkpoints (two ResNet18 layouts and a ResNet34), a zoo of them, and a data set."""
    root = tmp_path_factory.mktemp("cli")
    ckpts = root / "ckpts"
    ckpts.mkdir()
    save_pth(torch_resnet("resnet18", 1), ckpts / "r18_a.pth")
    save_pth(torch_resnet("resnet18", 2), ckpts / "r18_b.pt", wrap="state_dict", prefix="module.")
    save_pth(torch_resnet("resnet34", 3), ckpts / "r34.pth")
    data = write_image_folder(root / "data", per_class={"crack": 7, "ok": 9, "scratch": 5})
    zoo = root / "zoo"
    result = cli("convert", ckpts, "--zoo", zoo)
    assert result.returncode == 0, result.stderr
    return root, ckpts, data, zoo


def snapshot(folder):
    """Everything under a folder, with file contents: to prove a failed command changed nothing."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_zoo_list(workspace):
    _, ckpts, _, zoo = workspace
    result = cli("zoo", "list", zoo, "--json", "-")
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)["models"]
    assert [(m["name"], m["arch"], m["source_format"]) for m in models] == [
        ("r18_a", "resnet18", "pytorch"), ("r18_b", "resnet18", "pytorch"),
        ("r34", "resnet34", "pytorch")]
    assert models[0]["checkpoint"] == "checkpoints/r18_a"
    assert (zoo / models[0]["source"]).resolve() == (ckpts / "r18_a.pth").resolve()
    assert len(models[0]["sha256"]) == 64
    assert "r34" in result.stderr  # the table, for people, on stderr


def test_extract_score_rank_agree(workspace, tmp_path):
    _, _, data, zoo = workspace
    feats = tmp_path / "feats"
    r = cli("extract", zoo, data, "--out", feats, "--image-size", SIZE, "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in feats.iterdir()) == ["r18_a.npz", "r18_b.npz", "r34.npz"]
    with np.load(feats / "r34.npz") as z:
        assert z["layer3.0"].shape == z["layer3.1"].shape == (21, 256)
        assert z["layer3.0"].dtype == np.float32
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [0] * 7 + [1] * 9 + [2] * 5
        assert z["paths"][0] == os.path.join("crack", "img_000.png")
        assert z["classes"].tolist() == ["crack", "ok", "scratch"]

    scored = cli("score", feats, "--json", "-")
    assert scored.returncode == 0, scored.stderr
    cache = tmp_path / "cache"
    ranked = cli("rank", zoo, data, "--image-size", SIZE, "--batch-size", "8", "--json", "-",
                 "--cache-dir", cache)
    assert ranked.returncode == 0, ranked.stderr
    by_score, by_rank = json.loads(scored.stdout), json.loads(ranked.stdout)
    assert [m["name"] for m in by_rank["models"]] == [m["name"] for m in by_score["models"]]
    for a, b in zip(by_rank["models"], by_score["models"], strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-12)
        assert set(a["block_scores"]) == {"layer3.0", "layer3.1"}
    assert [m["rank"] for m in by_rank["models"]] == [1, 2, 3]
    assert by_rank["dataset"] == {"root": str(data.resolve()), "n_images": 21,
                                  "classes": ["crack", "ok", "scratch"]}
    settings = by_rank["settings"]
    # The settings block is settings.to_json of the run's ExtractSettings + ScoreSettings, keys
    # as before the settings classes existed.
    assert list(settings) == ["train_fraction", "seed", "image_size", "blocks", "rcond",
                              "precision", "metrics", "resamples", "confidence",
                              "forward_dtype", "forward_engine"]
    # The engine that ran (it keys the cache too), never "auto".
    assert settings["forward_engine"] in ("jax", "onnxruntime")
    assert list(by_score["settings"]) == ["train_fraction", "seed", "blocks", "rcond",
                                          "precision", "metrics", "resamples", "confidence"]
    assert settings["precision"] == "float64" and settings["image_size"] == 32
    assert settings["train_fraction"] == 0.8 and settings["seed"] == 0

    again = cli("rank", zoo, data, "--image-size", SIZE, "--json", "-", "--cache-dir", cache)
    assert again.returncode == 0, again.stderr
    assert "reused cached features of 3 model(s)" in again.stderr
    assert json.loads(again.stdout) == by_rank
    reseeded = cli("rank", zoo, data, "--image-size", SIZE, "--json", "-", "--cache-dir", cache,
                   "--seed", "5")
    assert json.loads(reseeded.stdout)["settings"]["seed"] == 5


def test_convert_is_idempotent_and_names_clash(workspace, tmp_path):
    _, ckpts, _, _ = workspace
    zoo = tmp_path / "zoo"
    assert invoke("convert", ckpts / "r18_a.pth", "--zoo", zoo).returncode == 0
    before = snapshot(zoo)
    again = invoke("convert", ckpts / "r18_a.pth", "--zoo", zoo)
    assert again.returncode == 0 and "unchanged" in again.stderr
    assert snapshot(zoo) == before

    clash = invoke("convert", ckpts / "r34.pth", "--zoo", zoo, "--name", "r18_a")
    assert clash.returncode == 2
    assert "r34.pth" in error_line(clash) and "--overwrite" in error_line(clash)
    assert snapshot(zoo) == before

    replaced = invoke("convert", ckpts / "r34.pth", "--zoo", zoo, "--name", "r18_a", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    models = json.loads((zoo / "zoo.json").read_text())["models"]
    assert [(m["name"], m["arch"]) for m in models] == [("r18_a", "resnet34")]
    # The new checkpoint went to a folder the old zoo.json did not name (a crash before the
    # commit leaves the old model whole); the old folder is gone.
    assert [p.name for p in (zoo / "checkpoints").iterdir()] == [
        models[0]["checkpoint"].split("/")[1]]
    assert models[0]["checkpoint"].startswith("checkpoints/r18_a~")

    many = invoke("convert", ckpts, "--zoo", zoo, "--name", "x")
    assert many.returncode == 2 and "exactly one" in error_line(many)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/ddscore-evil')}",))


def make_bad_checkpoint(kind, folder, good):
    path = folder / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint at all" * 10)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "not_resnet":
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 8, 3))
        torch.save(net.state_dict(), path)
    elif kind == "mobilenet":
        import torchvision

        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    elif kind == "incomplete":
        import torchvision

        sd = torchvision.models.resnet50().state_dict()
        del sd["layer2.0.bn1.running_var"]
        torch.save(sd, path)
    elif kind == "code_pickle":
        torch.save({"conv1.weight": torch.zeros(1), "payload": Evil()}, path)
    elif kind == "wrong_suffix":
        path = folder / "model.h5"
        path.write_bytes(b"hdf5?")
    elif kind == "missing":
        path = folder / "nowhere.pth"
    return path


@pytest.mark.parametrize("kind,message", [
    ("garbage", "unreadable PyTorch checkpoint"),
    ("truncated", "unreadable PyTorch checkpoint"),
    ("not_resnet", "not a ResNet"),
    ("mobilenet", "not a ResNet v1"),
    ("incomplete", "layer2.0.bn1.running_var"),
    ("code_pickle", "refused"),
    ("wrong_suffix", "not a checkpoint this tool reads"),
    ("missing", "no such file"),
])
def test_bad_checkpoint_leaves_zoo_as_it_was(workspace, tmp_path, kind, message):
    _, ckpts, _, zoo = workspace
    marker = tmp_path / "pwned"
    bad = make_bad_checkpoint(kind, tmp_path, ckpts / "r18_a.pth")
    my_zoo = tmp_path / "zoo"
    shutil.copytree(zoo, my_zoo)
    before = snapshot(my_zoo)
    # Each checkpoint on its own: the good one is added whole, the bad one refused in one line.
    good = shutil.copy(ckpts / "r34.pth", tmp_path / "fresh.pth")
    result = invoke("convert", good, bad, "--zoo", my_zoo, env={"EVIL_MARKER": str(marker)})
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert line.startswith("error: ") and bad.name in line and message in line, line
    assert "Traceback" not in result.stderr
    after = snapshot(my_zoo)
    assert {k: v for k, v in after.items()
            if k != "zoo.json" and not k.startswith("checkpoints/fresh")} == {
        k: v for k, v in before.items() if k != "zoo.json"}
    names = [m["name"] for m in json.loads((my_zoo / "zoo.json").read_text())["models"]]
    assert names == [*(m["name"] for m in json.loads(before["zoo.json"])["models"]), "fresh"]
    assert not marker.exists()  # the pickled os.system never ran


def test_failed_convert_into_new_zoo_creates_nothing(tmp_path):
    bad = make_bad_checkpoint("garbage", tmp_path, None)
    result = invoke("convert", bad, "--zoo", tmp_path / "new_zoo")
    assert result.returncode == 2
    assert not (tmp_path / "new_zoo").exists()


def _bad_data(kind, root):
    d = root / "data"
    if kind == "missing_data":
        return d
    if kind == "empty_data":
        d.mkdir()
    elif kind == "one_class":
        write_image_folder(d, classes=("only",))
    elif kind == "corrupt_image":
        write_image_folder(d)
        (d / "ok" / "img_002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return d


@pytest.mark.parametrize("kind,message", [
    ("missing_data", "does not exist"),
    ("empty_data", "no class folders"),
    ("one_class", "only one class"),
    ("corrupt_image", "img_002.png"),
])
@pytest.mark.parametrize("command", ["rank", "extract"])
def test_bad_data(workspace, tmp_path, kind, message, command):
    _, _, _, zoo = workspace
    data = _bad_data(kind, tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = (["--json", out / "r.json", "--cache-dir", cache] if command == "rank"
            else ["--out", out])
    # Batches of 2: the corrupt image comes after three finished batches.
    result = invoke(command, zoo, data, "--image-size", SIZE, "--batch-size", "2", *args)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert line.startswith("error: ") and message in line, line
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())  # no partial output
    # Nor in the cache: no entry, no temporary, and no unfinished rows (*.partial), which could
    # never be resumed (fixing the image changes the data set's fingerprint).
    assert not cache.exists() or [p.name for p in cache.iterdir() if p.name != ".locks"] == []


def test_empty_or_missing_zoo(workspace, tmp_path):
    _, _, data, _ = workspace
    missing = invoke("rank", tmp_path / "nozoo", data)
    assert missing.returncode == 2 and "zoo.json" in error_line(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "zoo.json").write_text('{"models": []}')
    result = invoke("rank", empty, data)
    assert result.returncode == 2 and "has no models" in error_line(result)


def test_bad_options(workspace, tmp_path):
    _, _, data, zoo = workspace
    frac = invoke("rank", zoo, data, "--train-fraction", "1.5")
    assert frac.returncode == 2 and "--train-fraction" in error_line(frac)
    usage = invoke("rank", zoo)
    assert usage.returncode == 2  # missing argument: click's usage error, in one line too
    assert usage.stderr.count("\n") == 1 and "Missing argument" in error_line(usage), usage.stderr
    nofolder = invoke("rank", zoo, data, "--image-size", SIZE, "--json", tmp_path / "no" / "r.json")
    assert nofolder.returncode == 2 and "does not exist" in error_line(nofolder)
    assert invoke("--version").stdout.startswith("ddscore-jax ")


@pytest.mark.slow  # pre-trains four ResNet18s: minutes on 2 cores
def test_demo_runs_and_is_cached(tmp_path):
    """The README's first command: the full demo, first run (builds) and second run (cached)."""
    first = cli("demo", "--cache-dir", tmp_path / "demo", "--json", "-")
    assert first.returncode == 0, first.stderr
    ranking = json.loads(first.stdout)
    names = [m["name"] for m in ranking["models"]]
    assert sorted(names) == ["resnet18_digits", "resnet18_faces", "resnet18_random",
                             "resnet18_textures"]
    # The control: a texture-pretrained model must beat an untrained one on a texture target.
    assert names.index("resnet18_textures") < names.index("resnet18_random")
    assert ranking["settings"]["precision"] == "float64"
    assert "resnet18_textures" in first.stderr  # the table people read
    second = cli("demo", "--cache-dir", tmp_path / "demo", "--json", "-")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == ranking
    assert "pre-training" not in second.stderr  # nothing rebuilt


def test_several_metrics_one_column_each(workspace, tmp_path):
    from ddscore_jax import metrics
    from ddscore_jax.ddscore import train_indices

    _, _, data, zoo = workspace
    feats = tmp_path / "feats"
    assert cli("extract", zoo, data, "--out", feats, "--image-size", SIZE).returncode == 0
    ranked = cli("rank", zoo, data, "--image-size", SIZE, "--metric", "logme,ddscore",
                 "--metric", "leep", "--json", "-", "--cache-dir", tmp_path / "cache")
    assert ranked.returncode == 0, ranked.stderr
    doc = json.loads(ranked.stdout)
    assert doc["settings"]["metrics"] == ["logme", "ddscore", "leep"]
    assert "ranked by logme" in ranked.stderr
    by_name = {m["name"]: m for m in doc["models"]}
    scores = [m["score"] for m in doc["models"]]
    assert scores == sorted(scores, reverse=True)  # ranked by the first metric
    for name, m in by_name.items():
        assert m["score"] == m["metrics"]["logme"]
        with np.load(feats / f"{name}.npz") as z:
            idx = train_indices(len(z["labels"]), 0.8, 0)
            stacked = np.stack([z["layer3.0"][idx], z["layer3.1"][idx]])
            expected = metrics.logme(stacked, z["labels"][idx]).mean()
        assert m["metrics"]["logme"] == pytest.approx(expected, rel=1e-9)
        # Every checkpoint here has its torchvision head, so LEEP has a value in [-inf, 0].
        assert m["metrics"]["leep"] <= 0.0
        # Per-block values of every feature metric, not only of the first.
        blocks = m["metric_block_scores"]
        assert set(blocks) == {"logme", "ddscore", "leep"} and blocks["leep"] == {}
        assert blocks["logme"] == m["block_scores"]
        for metric in ("logme", "ddscore"):
            assert set(blocks[metric]) == {"layer3.0", "layer3.1"}
            assert np.mean(list(blocks[metric].values())) == pytest.approx(
                m["metrics"][metric], rel=1e-12)

    scored = cli("score", feats, "--metric", "gbc,knn", "--json", "-")
    assert scored.returncode == 0, scored.stderr
    # The progress shows the one compilation of both metrics (piped stderr shows no bars).
    seen = []
    api.score(feats, metrics=["gbc", "knn"], progress=lambda d, _c, _t: seen.append(d))
    assert any(d.startswith("compiling gbc, knn") for d in seen), seen
    for m in json.loads(scored.stdout)["models"]:
        assert set(m["metric_block_scores"]) == {"gbc", "knn"}
        assert m["metric_block_scores"]["gbc"] == m["block_scores"]

    no_head_metric = invoke("score", feats, "--metric", "nce")
    assert no_head_metric.returncode == 2 and "use `ddscore-jax rank`" in error_line(no_head_metric)
    unknown = invoke("score", feats, "--metric", "nope")
    assert unknown.returncode == 2 and "unknown metric" in error_line(unknown)


def test_help_lists_the_choices_and_click_refuses_others(workspace):
    from ddscore_jax.metrics import METRICS

    _, _, data, zoo = workspace
    shown = invoke("rank", "--help", env={"COLUMNS": "400"})
    assert shown.returncode == 0
    help_text = " ".join(shown.stdout.split())
    assert "float32|bfloat16" in help_text and "[default: 0.8]" in help_text
    # rich would swallow a "[default: ...]" typed into the help as markup; show_default is kept.
    assert "features/ in $DDSCORE_JAX_CACHE" in help_text
    assert all(name in help_text for name in METRICS)  # from the registry
    tuned = invoke("finetune", "--help", env={"COLUMNS": "400"})
    assert "sgd|adamw" in tuned.stdout and "cosine|constant" in tuned.stdout
    for command, option, value in (("rank", "--dtype", "float16"),
                                   ("finetune", "--optimizer", "lion"),
                                   ("finetune", "--schedule", "step")):
        extra = ["--out", "r.json"] if command == "finetune" else []
        refused = invoke(command, zoo, data, *extra, option, value)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        line = error_line(refused)
        assert line.startswith(f"error: Invalid value for '{option}'") and value in line, line


def test_every_option_default_and_choice_is_its_settings_objects():
    """The CLI is built from the settings objects: each option of a setting has that field's
    default and, for a ``Literal`` field, exactly its choices; every other option is plumbing
    (paths, outputs, caching), so a default typed into the CLI has nowhere to hide."""
    import dataclasses
    import typing

    import typer

    from ddscore_jax import evaluation, finetuning, settings
    from ddscore_jax.cli.app import app

    commands = typer.main.get_command(app).commands
    plumbing = {"zoo_dir", "data_root", "out", "json_out", "csv_out", "quiet", "cache_dir",
                "no_cache", "feats",
                "files", "figure", "no_figure", "models", "top", "ranking"}
    # (settings class, {field: option} where the names differ, fields the CLI does not expose)
    built_from = {
        "extract": [(settings.ExtractSettings, {}, set())],
        "score": [(settings.ScoreSettings, {"metrics": "metric"}, set())],
        "rank": [(settings.ExtractSettings, {}, set()),
                 (settings.ScoreSettings, {"metrics": "metric"}, set())],
        "finetune": [(finetuning.Settings, {"learning_rates": "learning_rate"}, set())],
        "evaluate": [(evaluation.Settings, {}, {"seed"})],  # seeded: fixed, recorded in the docs
    }
    for command, sources in built_from.items():
        options = {p.name: p for p in commands[command].params}
        covered = set()
        for cls, renamed, hidden in sources:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in hidden:
                    continue
                name = renamed.get(f.name, f.name)
                assert name in options, f"{command}: no option for {cls.__name__}.{f.name}"
                option, covered = options[name], covered | {name}
                if f.name == "learning_rates":  # repeatable; unset means the settings' grid
                    assert option.default is None
                    assert option.show_default == ", ".join(map(str, f.default))
                elif isinstance(f.default, tuple):
                    assert tuple(option.default) == f.default, (command, name)
                else:
                    assert option.default == f.default, (command, name, option.default)
                if typing.get_origin(hints[f.name]) is typing.Literal:
                    assert tuple(option.type_descriptor.choices) == typing.get_args(
                        hints[f.name]), (command, name)
        assert set(options) - covered <= plumbing, (command, set(options) - covered - plumbing)
    # The options with a fixed set of values are Literals (listed by --help), not free strings.
    for cls, name in ((settings.ExtractSettings, "dtype"), (settings.ExtractSettings, "engine"),
                      (finetuning.Settings, "optimizer"), (finetuning.Settings, "schedule")):
        assert typing.get_origin(typing.get_type_hints(cls)[name]) is typing.Literal, name


def test_out_of_range_values_are_refused_by_the_settings_check(workspace, tmp_path):
    """One validation per value, the settings object's: the same line from the CLI as from the
    library, exit 2, before any work (no results file, no cache)."""
    _, _, data, zoo = workspace
    results = tmp_path / "r.json"
    for args, line in (
            (("rank", zoo, data, "--batch-size", "0", "--cache-dir", tmp_path / "c"),
             "error: --batch-size must be at least 1, got 0"),
            (("extract", zoo, data, "--out", tmp_path / "f", "--workers", "-1"),
             "error: --workers must be at least 0, got -1"),
            (("finetune", zoo, data, "--out", results, "--batch-size", "0"),
             "error: --batch-size must be at least 1, got 0"),
            (("evaluate", tmp_path / "s.json", results, "--bootstrap", "50"),
             "error: --bootstrap must be at least 100, got 50")):
        refused = invoke(*args)
        assert refused.returncode == 2 and error_line(refused) == line, refused.stderr
    assert list(tmp_path.iterdir()) == []

"""What the command prints and where (issues 15 and 17), through the real CLI: the table on stdout,
only JSON/CSV there when asked, names and paths printed as given, --quiet, the next-step line,
the help text, a startup that imports no JAX, and a read-only feature cache."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import cli, error_line, save_pth, torch_resnet, write_image_folder

# Brackets rich would read as markup, an emoji code, spaces and non-ASCII.
ODD = "v[2] [bold]é :cat:"
CLASSES = ("crack [x]", "ok :cat:", "scratch é")


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A zoo and a data set under paths that hold markup, with two copies of one checkpoint
    (a, b: told apart by nothing) and a different one (c)."""
    # The zoo itself lives under a plain path: Orbax cannot read back a checkpoint under one with
    # [ or ] (convert refuses such a zoo: test_a_zoo_path_with_brackets_is_refused); every other
    # path here holds them.
    root = tmp_path_factory.mktemp("out")
    ckpts = root / f"ckpts {ODD}"
    ckpts.mkdir(parents=True)
    save_pth(torch_resnet("resnet18", 1), ckpts / "a.pth")
    shutil.copy(ckpts / "a.pth", ckpts / "b.pth")
    save_pth(torch_resnet("resnet18", 2), ckpts / "c.pth")
    data = write_image_folder(root / f"data {ODD}", per_class=6, classes=CLASSES)
    zoo = root / "zoo"
    converted = cli("convert", ckpts, "--zoo", zoo)
    assert converted.returncode == 0, converted.stderr
    assert f"added a to {zoo}" in converted.stderr  # the zoo path as given
    cache = root / f"cache {ODD}"
    return root, zoo, data, cache


def _rank(odd, *extra, env=None):
    root, zoo, data, cache = odd
    return cli("rank", zoo, data, "--image-size", "32", "--cache-dir", cache, *extra, env=env)


def test_the_table_goes_to_stdout_with_intervals_and_the_next_step(odd):
    root, zoo, data, _ = odd
    r = _rank(odd, env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert str(data) in r.stdout  # the title's path, brackets and all
    for column in ("D-deepscore", "95% interval", "rank 95%", "P(best)", "layer3.0"):
        assert column in r.stdout, column
    rows = {ln.split("│")[2].strip(): ln for ln in lines if ln.count("│") > 4}
    assert set(rows) == {"a", "b", "c"}
    assert "D-deepscore" not in r.stderr and "P(best)" not in r.stderr  # only notes there
    # a and b are the same checkpoint: never told apart, so both are in the leader's group
    # (marked *) or neither leads; the next step names the group and the command that settles it.
    step = [ln for ln in r.stderr.splitlines() if ln.startswith("next:")]
    assert len(step) == 1, r.stderr
    group = step[0].split("(")[1].split(")")[0].split(", ") if "cannot be told" in step[0] \
        else [step[0].split()[1]]
    assert {"a", "b"} <= set(group) or not {"a", "b"} & set(group), step
    assert all("*" in rows[name] for name in group)
    # The data has no train/ and valid/ to fine-tune on: the command says what DATA must be.
    assert f"ddscore-jax finetune {zoo} DATA --models {','.join(group)}" in step[0]
    assert "(DATA: a folder with train/ and valid/; rank DATA/train)" in step[0]


def test_json_or_csv_on_stdout_is_all_that_is_there(odd, tmp_path):
    r = _rank(odd, "--json", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # nothing else on stdout
    assert [m["name"] for m in doc["models"]] and "P(best)" in r.stderr  # the table moved
    first = doc["models"][0]
    assert len(first["interval"]) == 2 and 0 <= first["p_best"] <= 1

    r = _rank(odd, "--csv", "-", "--quiet")
    assert r.returncode == 0, r.stderr
    table = list(csv.reader(io.StringIO(r.stdout)))
    assert table[0][:4] == ["rank", "name", "ddscore", "ddscore_lo"]
    assert sorted(row[1] for row in table[1:]) == ["a", "b", "c"]
    assert [row[2] for row in table[1:]] == [str(m["score"]) for m in doc["models"]]

    # A saved ranking: the next step is --top 1 --ranking FILE.
    saved = tmp_path / f"ranking {ODD}.json"
    r = _rank(odd, "--json", saved, "--csv", tmp_path / "r.csv")
    assert r.returncode == 0, r.stderr
    assert json.loads(saved.read_text())["models"] and (tmp_path / "r.csv").is_file()
    step = [ln for ln in r.stderr.splitlines() if ln.startswith("next:")]
    assert step and f"--top 1 --ranking '{saved}'" in step[0], r.stderr


def test_quiet_keeps_results_and_errors_only(odd):
    root, zoo, data, cache = odd
    loud = _rank(odd)
    assert "reused cached features" in loud.stderr and "next:" in loud.stderr, loud.stderr
    r = _rank(odd, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "P(best)" in r.stdout
    # No bars, no "reused cached features", no next step; a library warning would stay.
    assert all(ln.startswith(str(data)) or "warning" in ln.lower()
               for ln in r.stderr.splitlines() if ln.strip()), r.stderr
    assert "reused cached" not in r.stderr and "next:" not in r.stderr
    bad = cli("rank", zoo, data, "--quiet", "--image-size", "8")
    assert bad.returncode == 2 and "--image-size must be at least 32" in error_line(bad)


def test_every_user_string_prints_as_given(odd, tmp_path):
    root, zoo, data, _ = odd
    feats = tmp_path / "feats[v2] [bold]é"
    r = cli("extract", zoo, data, "--out", feats, "--image-size", "32")
    assert r.returncode == 0, r.stderr
    assert f"wrote {feats / 'a.npz'}" in r.stderr
    r = cli("score", feats, "--resamples", "0", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert f"D-deepscore of {feats}" in r.stdout
    r = cli("zoo", "list", zoo, env={"COLUMNS": "300"})
    assert r.returncode == 0 and str(zoo) in r.stdout, r.stdout
    missing = tmp_path / "no [bold]such[/bold] :cat: é"
    r = cli("rank", missing, data)
    assert r.returncode == 2 and str(missing) in error_line(r), r.stderr
    # Class names (the demo's title lists them) and finetune's title: through the same consoles.
    from ddscore_jax.cli import _common

    assert not _common.console._markup and not _common.stdout._markup
    assert not _common.console._emoji and not _common.stdout._emoji


def test_a_zoo_path_with_brackets_is_refused(odd, tmp_path):
    root = odd[0]
    bad = tmp_path / "zoo[v2]"
    r = cli("convert", root / f"ckpts {ODD}" / "a.pth", "--zoo", bad)
    assert r.returncode == 2 and f"{bad}: a zoo path cannot hold [ ]" in error_line(r), r.stderr
    assert not bad.exists()


def test_resamples_zero_drops_the_interval_columns(odd):
    r = _rank(odd, "--resamples", "0", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "P(best)" not in r.stdout and "next:" not in r.stderr
    bad = _rank(odd, "--resamples", "5")
    assert bad.returncode == 2 and "--resamples" in error_line(bad)


def test_decimals_follow_the_interval_width():
    from ddscore_jax.cli.ranking_table import decimals

    assert decimals([0.013, 0.5]) == 3  # two significant digits of the narrowest interval
    assert decimals([0.2]) == 2 and decimals([3.0]) == 1 and decimals([1e-9]) == 6
    assert decimals([]) == 6 and decimals([0.0]) == 6  # no information: as before


# ------------------------------------------------------------------------------ help, startup

HEAVY = ("jax", "flax", "torch", "optax", "orbax", "ddscore_jax.api", "ddscore_jax.metrics")


def _fresh(args: list[str], env: dict | None = None) -> tuple[int, str, list[str]]:
    """Run the CLI's entry point with ``args`` in a fresh interpreter; the heavy modules it
    imported on the way."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.argv = ["ddscore-jax", *{args!r}]
        from ddscore_jax.cli.app import main
        try:
            main()
        except SystemExit as e:
            code = e.code
        else:
            code = 0
        print("\\nIMPORTED", json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=120)
    out, _, imported = r.stdout.rpartition("\nIMPORTED ")
    return r.returncode, out + r.stderr, json.loads(imported)


@pytest.mark.parametrize("args", [["--help"], ["rank", "--help"], ["--version"],
                                  ["finetune", "--help"], ["rank", "--nope"], ["rank"],
                                  ["evaluate", "--help"], ["zoo", "list", "--help"]])
def test_help_version_and_usage_errors_import_no_jax(args):
    _, out, imported = _fresh(args)
    assert imported == [], (args, imported, out)


def test_completion_answers_without_jax():
    _, out, imported = _fresh([], env={"_DDSCORE_JAX_COMPLETE": "complete_bash",
                                       "COMP_WORDS": "ddscore-jax ra", "COMP_CWORD": "1"})
    assert "rank" in out and imported == [], out


def test_help_reads_like_the_readme():
    for command in ("rank", "convert", "finetune", "evaluate", "score", "extract"):
        r = cli(command, "--help", env={"COLUMNS": "120"})
        assert r.returncode == 0 and "Examples:" in r.stdout, (command, r.stdout)
        assert "<bool>" not in r.stdout and "{" not in r.stdout.splitlines()[0], r.stdout
    rank = cli("rank", "--help", env={"COLUMNS": "120"}).stdout
    assert rank.startswith("Usage: ddscore-jax rank [OPTIONS] ZOO DATA\n"), rank
    assert "(the [cpu] extra)" in " ".join(rank.split())
    assert "--seed N" in rank and "--dtype [float32|bfloat16]" in rank and "-q, --quiet" in rank
    top = cli("--help").stdout
    assert "--install-completion" in top and "<bool>" not in top


def test_the_light_metric_names_are_the_registry():
    from ddscore_jax.metrics import METRICS
    from ddscore_jax.settings import HEAD_METRICS, METRIC_NAMES

    assert METRIC_NAMES == tuple(METRICS)
    assert HEAD_METRICS == tuple(n for n, m in METRICS.items() if m.needs_head)


# ------------------------------------------------------------------------- read-only cache


def _read_only_mount(source, target, command: list[str]) -> list[str]:
    """``command`` run where ``target`` is ``source`` bound read-only, in a mount namespace of
    its own (nothing changes outside it). The OS refuses writes there with EROFS even to root,
    unlike a chmod; ``--map-root-user`` lets a non-root user make the namespace."""
    script = 'mount --bind -o ro "$1" "$2" && shift 2 && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
            str(source), str(target), *command]


def test_a_read_only_cache_ranks_without_caching_and_says_so(odd, tmp_path):
    root, zoo, data, _ = odd
    source, target = tmp_path / "src", tmp_path / "ro"
    (source / "features").mkdir(parents=True)  # an existing cache folder, read-only
    target.mkdir()
    probe = subprocess.run(_read_only_mount(source, target, ["touch", str(target / "x")]),
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr
    for how, extra in (("--cache-dir", ["--cache-dir", str(target / "features")]),
                       ("DDSCORE_JAX_CACHE", []),
                       ("a missing folder", ["--cache-dir", str(target / "new" / "features")])):
        cmd = [sys.executable, "-m", "ddscore_jax.cli", "rank", str(zoo), str(data),
               "--image-size", "32", "--resamples", "0", *extra]
        r = subprocess.run(_read_only_mount(source, target, cmd), capture_output=True, text=True,
                           env={**os.environ, "DDSCORE_JAX_CACHE": str(target)}, timeout=600)
        assert r.returncode == 0, (how, r.stderr)
        warnings = [ln for ln in r.stderr.splitlines() if "feature cache" in ln]
        assert len(warnings) == 1 and "read-only file system" in warnings[0], (how, r.stderr)
        assert "ranking without it" in warnings[0] and "D-deepscore" in r.stdout
    assert list(source.rglob("*")) == [source / "features"]  # nothing was written


def test_the_next_step_fine_tunes_the_parent_of_a_scored_train_folder(tmp_path):
    from ddscore_jax.api import Ranking
    from ddscore_jax.cli.ranking_table import next_step
    from ddscore_jax.ddscore import ModelScore, Uncertainty

    for part in ("train", "valid"):
        (tmp_path / "data" / part).mkdir(parents=True)
    models = [ModelScore(n, s, {}, {"ddscore": s}, {}, {"ddscore": Uncertainty(
        (s - 0.1, s + 0.1), (1, 2), p, tied)}) for n, s, p, tied in
        (("a", 1.0, 0.6, True), ("b", 0.95, 0.4, True), ("c", 0.5, 0.0, False))]
    ranking = Ranking(models, {}, {"metrics": ["ddscore"], "resamples": 200})
    line = next_step(ranking, tmp_path / "zoo", tmp_path / "data" / "train", None)
    assert line.endswith(f"ddscore-jax finetune {tmp_path / 'zoo'} {tmp_path / 'data'} "
                         "--models a,b --out finetuned.json"), line
    assert "2 models cannot be told apart from the leader" in line
    saved = next_step(ranking, tmp_path / "zoo", tmp_path / "data", "r.json")
    assert saved.endswith("--top 1 --ranking r.json --out finetuned.json"), saved

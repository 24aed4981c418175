"""finetune and evaluate under faults: kill -9 and SIGTERM at every write step of finetune, two
finetune on one results file, and evaluate's inputs that do not belong together. The real CLI in
subprocesses for anything a process does (signals, locks); the kills come from the fault hook
(``DDSCORE_JAX_FAULT``, ``ddscore_jax.atomic.fault_point``), so every step is hit exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, cli_in_process, error_line, write_image_folder

from ddscore_jax import model, zoo

# One training step per run (6 training images, batch 6, 1 epoch), two rates: 4 runs.
TUNE = ("--image-size", "32", "--batch-size", "6", "--epochs", "1",
        "--learning-rate", "1e-3", "--learning-rate", "1e-4")
N_RUNS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A zoo of two random ResNet18s, a train/valid/test data set, and the results of one
    uninterrupted finetune (the reference every interrupted one must end up equal to). The
    test/ folder keeps the splits the same whatever grid a command runs (without it, valid/ is
    halved only when there are rates to choose between)."""
    root = tmp_path_factory.mktemp("faults_trust")
    zoo_dir = root / "zoo"
    config = model.CONFIGS["resnet18"]
    for i, name in enumerate(("a", "b")):
        zoo.add(zoo_dir, [zoo.Addition(name, root / f"{name}.pth", "pytorch", f"{i}" * 64,
                                       model.ImportedModel(config,
                                                           model.init_state_dict(config, i)))])
    data = root / "data"
    write_image_folder(data / "train", per_class=2, size=(32, 32), seed=1)
    write_image_folder(data / "valid", per_class=2, size=(32, 32), seed=2)
    write_image_folder(data / "test", per_class=2, size=(32, 32), seed=3)
    reference = root / "reference.json"
    done = cli("finetune", zoo_dir, data, "--out", reference, *TUNE)
    assert done.returncode == 0, done.stderr
    return zoo_dir, data, json.loads(reference.read_text())


def timeless(doc: dict) -> dict:
    """A results document without its wall-clock times: what must be bit-identical."""
    doc = json.loads(json.dumps(doc))
    for r in [*doc["runs"], *doc["models"]]:
        r.pop("seconds", None)
    return doc


def run_key(r: dict) -> tuple:
    return r["name"], r["learning_rate"], r["seed"]


def assert_consistent(doc: dict, reference: dict) -> None:
    """Every run is one of the reference's, bit for bit, and none twice; a model has a line only
    when all its runs are in (a half-finished model is never recorded as done)."""
    ref = {run_key(r): r for r in timeless(reference)["runs"]}
    runs = timeless(doc)["runs"]
    assert len({run_key(r) for r in runs}) == len(runs)
    for r in runs:
        assert r == ref[run_key(r)]
    for m in doc["models"]:
        assert sum(r["name"] == m["name"] for r in runs) == N_RUNS // 2, m["name"]


# Every step of a results write, and the point between a finished run and its write; kill -9
# and SIGTERM. The quick tier keeps one of each.
FAULTS = [("results:written@2", -9), ("finetune:run@3=TERM", 143),
          *(pytest.param(*f, marks=pytest.mark.slow) for f in (
              ("finetune:run@1", -9), ("finetune:run@3", -9), ("results:replaced@2", -9),
              ("results:written@4", -9), ("results:written@2=TERM", 143),
              ("results:replaced@3=TERM", 143)))]


@pytest.mark.parametrize(("fault", "code"), FAULTS)
def test_finetune_killed_at_any_step_resumes_to_the_same_results(workspace, tmp_path, fault,
                                                                 code):
    zoo_dir, data, reference = workspace
    results = tmp_path / "results.json"
    killed = cli("finetune", zoo_dir, data, "--out", results, *TUNE,
                 env={"DDSCORE_JAX_FAULT": fault})
    assert killed.returncode == code, killed.stderr  # the hook reached the step
    assert not list(tmp_path.glob(".results.json.*.tmp")) or code == -9
    kept = json.loads(results.read_text()) if results.exists() else None
    if kept is not None:
        assert_consistent(kept, reference)
    if code == 143:  # SIGTERM waits for a write under way and says what is kept
        n = len(kept["runs"]) if kept else 0
        assert error_line(killed) == (f"terminated: {n} of {N_RUNS} fine-tuning run(s) are in "
                                      f"{results}; the next run resumes from there")

    resumed = cli("finetune", zoo_dir, data, "--out", results, *TUNE)
    assert resumed.returncode == 0, resumed.stderr
    after = json.loads(results.read_text())
    assert timeless(after) == timeless(reference)  # bit-identical to an uninterrupted run
    if kept is not None:  # exactly the unfinished runs were redone: the others kept as they were
        assert after["runs"][:len(kept["runs"])] == kept["runs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.json.lock", "results.json"]


def test_two_finetunes_on_one_results_file_lose_nothing(workspace, tmp_path):
    zoo_dir, data, reference = workspace
    results = tmp_path / "results.json"
    base = [sys.executable, "-m", "ddscore_jax.cli", "finetune", str(zoo_dir), str(data),
            "--out", str(results), *TUNE[:6]]
    # Each its own learning rate: both start from an empty file, and each writes twice.
    procs = [subprocess.Popen([*base, "--learning-rate", lr], stderr=subprocess.PIPE, text=True)
             for lr in ("1e-3", "1e-4")]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
        p.stderr.close()
    doc = json.loads(results.read_text())
    assert sorted(map(run_key, doc["runs"])) == sorted(map(run_key, reference["runs"]))
    # Every model's line is there (the last writer's grid), no run twice, each bit-identical.
    assert [m["name"] for m in doc["models"]] == ["a", "b"]
    doc["models"] = []
    assert_consistent(doc, reference)
    # Both rates in one command now: everything is there, nothing is trained.
    again = cli("finetune", zoo_dir, data, "--out", results, *TUNE)
    assert again.returncode == 0, again.stderr
    assert timeless(json.loads(results.read_text()))["runs"] == timeless(doc)["runs"]


@pytest.mark.slow  # two more fine-tuning processes; the race above is the quick tier's
def test_two_finetunes_of_the_same_grid_train_each_run_once_in_the_file(workspace, tmp_path):
    zoo_dir, data, reference = workspace
    results = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "ddscore_jax.cli", "finetune", str(zoo_dir), str(data),
           "--out", str(results), *TUNE]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
        p.stderr.close()
    doc = json.loads(results.read_text())
    assert len(doc["runs"]) == N_RUNS
    assert timeless(doc)["models"] == timeless(reference)["models"]
    assert_consistent(doc, reference)


# ---------------------------------------------------------------------------------------------
# evaluate: scores and results that do not belong together


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


@pytest.fixture(scope="module")
def pair(workspace, tmp_path_factory):
    """Real scores of DATA/train (rank --json) and the reference results of DATA."""
    zoo_dir, data, reference = workspace
    root = tmp_path_factory.mktemp("evaluate")
    scores = root / "scores.json"
    ranked = cli("rank", zoo_dir, data / "train", "--image-size", "32", "--json", scores,
                 "--cache-dir", root / "cache")
    assert ranked.returncode == 0, ranked.stderr
    return json.loads(scores.read_text()), reference


def _evaluate(tmp_path: Path, scores: object, results: object):
    s = _write(tmp_path / "scores.json", scores)
    r = _write(tmp_path / "results.json", results)
    return cli_in_process("evaluate", s, r, "--no-figure"), s, r


def test_evaluate_accepts_the_real_pair(pair, tmp_path):
    scores, results = pair
    r, _, _ = _evaluate(tmp_path, scores, results)
    assert r.returncode == 0, r.stderr


def _named(doc: dict, name: str) -> dict:
    return next(m for m in doc["models"] if m["name"] == name)


def _other_data(scores, results):
    results = json.loads(json.dumps(results))
    results["dataset"]["train"]["root"] = "/elsewhere/train"
    return scores, results


def _other_classes(scores, results):
    scores = json.loads(json.dumps(scores))
    scores["dataset"]["classes"] = ["cat", "dog", "fish"]
    return scores, results


def _other_zoo(scores, results):
    results = json.loads(json.dumps(results))
    results["models"][0]["sha256"] = "f" * 64
    return scores, results


def _score_only(scores, results):
    results = json.loads(json.dumps(results))
    results["models"] = results["models"][1:]
    return scores, results


def _result_only(scores, results):
    scores = json.loads(json.dumps(scores))
    scores["models"] = [m for m in scores["models"] if m["name"] != "b"]
    return scores, results


def _duplicated_score(scores, results):
    scores = json.loads(json.dumps(scores))
    scores["models"].append(dict(_named(scores, "a")))
    return scores, results


def _duplicated_result(scores, results):
    results = json.loads(json.dumps(results))
    results["models"].append(dict(results["models"][0]))
    return scores, results


def _nan_accuracy(scores, results):
    text = json.dumps(results).replace(
        f'"held_out_accuracy": {json.dumps(results["models"][0]["held_out_accuracy"])}',
        '"held_out_accuracy": NaN', 1)
    results = json.loads(text)
    results["models"][0]["seed_accuracies"] = [float("nan")]
    return scores, json.dumps(results)


def _string_accuracy(scores, results):
    results = json.loads(json.dumps(results))
    results["models"][0]["held_out_accuracy"] = "0.5"
    results["models"][0]["seed_accuracies"] = ["0.5"]
    return scores, results


def _accuracy_out_of_range(scores, results):
    results = json.loads(json.dumps(results))
    results["models"][0]["held_out_accuracy"] = 1.5
    results["models"][0]["seed_accuracies"] = [1.5]
    return scores, results


def _models_not_a_list(scores, results):
    results = json.loads(json.dumps(results))
    results["models"] = {m["name"]: m for m in results["models"]}
    return scores, results


def _scores_models_wrong_shape(scores, results):
    scores = json.loads(json.dumps(scores))
    scores["models"][1] = ["a", 1.0]
    return scores, results


def _dataset_wrong_shape(scores, results):
    results = json.loads(json.dumps(results))
    results["dataset"] = "data"
    return scores, results


def _nan_score(scores, results):
    scores = json.loads(json.dumps(scores))
    _named(scores, "a")["score"] = "high"
    return scores, results


EVALUATE_CASES = [
    (_other_data, "both", "scores and fine-tuning results of different data sets"),
    (_other_classes, "both", "different class lists"),
    (_other_zoo, "both", "model 'a' is another checkpoint"),
    (_score_only, "both", "models scored but not fine-tuned: a"),
    (_result_only, "both", "models fine-tuned but not scored: b"),
    (_duplicated_score, "scores", "model 'a' appears twice"),
    (_duplicated_result, "results", "model 'a' appears twice"),
    (_nan_accuracy, "results", "model 'a' has a non-numeric or non-finite accuracy"),
    (_string_accuracy, "results", "model 'a' has a non-numeric or non-finite accuracy"),
    (_accuracy_out_of_range, "results", "model 'a' has an accuracy outside [0, 1]"),
    (_models_not_a_list, "results", "not a fine-tuning results file"),
    (_scores_models_wrong_shape, "scores", "every model needs a \"name\""),
    (_dataset_wrong_shape, "results", "\"dataset\" is not an object"),
    (_nan_score, "scores", "model 'a' has a non-numeric score"),
]


@pytest.mark.parametrize(("edit", "named", "says"), EVALUATE_CASES,
                         ids=[c[0].__name__.strip("_") for c in EVALUATE_CASES])
def test_evaluate_refuses_what_does_not_belong_together(pair, tmp_path, edit, named, says):
    r, s, a = _evaluate(tmp_path, *edit(*pair))
    assert r.returncode == 2, r.stderr
    line = error_line(r)
    assert line.startswith("error: ") and says in line, line
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if named == "both":
        assert line.startswith(f"error: {s} and {a}: "), line
    else:
        assert line.startswith(f"error: {s if named == 'scores' else a}: "), line


def test_evaluate_outputs_where_the_folder_refuses_files(pair, tmp_path):
    s = _write(tmp_path / "scores.json", pair[0])
    a = _write(tmp_path / "results.json", pair[1])
    for args, named in ((("--json", "/proc/e.json", "--no-figure"), "/proc/e.json"),
                        (("--figure", "/proc/f.png"), "/proc/f.png")):
        r = cli_in_process("evaluate", s, a, *args)
        assert r.returncode == 2, r.stderr
        assert error_line(r) == (f"error: {named}: cannot be created: folder /proc refuses new "
                                 "files (choose another location)")


def test_evaluate_knows_the_results_kind_finetune_writes():
    from ddscore_jax import evaluation, finetuning

    assert evaluation.RESULTS_KIND == finetuning.RESULTS_KIND

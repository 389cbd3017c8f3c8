"""Bad input, tried as a new user would: every case goes through the real command line
(``cadis.cli.main``, one case through ``python -m cadis``) and must end in exit code 2, exactly
one ``cadis: error:`` line naming the problem, no traceback, and the folder it ran in exactly
as it was: no results folder, records, checkpoint or MLflow store was made (so no MLflow run
can be left RUNNING). Sweeps are dry runs: a dry run refuses what a real run would refuse
before its first trial, and starts no Ray.

Cases other files already show in more depth (and are not repeated here): the sweep schema's
many keys (tests/test_sweep_config.py::test_bad_sweep_is_one_line_naming_the_key), resources
the cluster cannot hold (tests/test_sweep.py::test_bad_sweeps_fail_before_any_trial_or_run),
certify's flags (tests/test_certify_cli.py::test_bad_input_is_one_line_and_exit_two) and
pretraining on a bad folder (tests/test_imagefolder.py::test_a_bad_folder_is_one_line_exit_two).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import json

import pytest
import yaml

from cadis.cli import main
from cadis.smoothing.records import (
    RECORDS_FILENAME,
    RECORDS_HEADER,
    SETTINGS_FILENAME,
    Record,
    write_records,
)
from tests.test_imagefolder import make_tree
from tests.test_sweep import tiny_sweep

REPO = Path(__file__).resolve().parents[1]
QUICK_CERTIFY = ["--sigma", "0.5", "--n", "10", "--n0", "5", "--max-images", "1", "--quiet"]


@dataclass
class Inputs:
    """What a case builds its command from: a scratch folder and the tiny models."""

    tmp: Path
    models: Path
    checkpoints: Path

    def sweep(self, *extra: str, base: dict | None = None, **changes) -> list[str]:
        """A dry run of the tiny sweep with ``changes`` (top-level) and ``base`` updates."""
        data = tiny_sweep(self.models, self.tmp, **changes)
        data["base"].update(base or {})
        path = self.tmp / "sweep.yaml"
        path.write_text(yaml.safe_dump(data))
        return ["sweep", str(path), "--dry-run", *extra]

    def folder_sweep(self, spoil: Callable[[Path], None]) -> list[str]:
        """A dry run on an ImageFolder tree (train/ and val/, 3 classes) that ``spoil`` breaks."""
        tree = self.tmp / "images"
        make_tree(tree, {"train": 2, "val": 1})
        spoil(tree)
        return self.sweep(base={"dataset": "imagefolder", "data_root": str(tree),
                                "image_size": 8, "val_images": 3, "proxy_images": 3},
                          certify={"rank": {"n": 20, "n0": 5, "images": 3}})

    def certify(self, *extra: str) -> list[str]:
        return ["certify", "--models", str(self.models), *QUICK_CERTIFY,
                "--out", str(self.tmp / "run"), *extra]

    def checkpoint(self, name: str) -> list[str]:
        """certify with a copy of one of the prepared (bad) checkpoints."""
        copy = self.tmp / name
        shutil.copytree(self.checkpoints / name, copy)
        return self.certify("--checkpoint", str(copy))

    def train(self, *sets: str) -> list[str]:
        args = ["train", str(REPO / "sweeps" / "default.yaml"), "--out", str(self.tmp / "out"),
                "--quiet", "--set", f"models={self.models}"]
        for item in sets:
            args += ["--set", item]
        return args

    def records(self, name: str, images: int = 3, **settings: object) -> str:
        """A records folder as `cadis certify` leaves one (records.tsv, settings.json) of
        ``images`` images, made with QUICK_CERTIFY's settings changed by ``settings``."""
        folder = self.tmp / name
        folder.mkdir()
        write_records(folder / RECORDS_FILENAME, [Record.from_prediction(index, 1, 1, 0.2, 0.1)
                                                  for index in range(images)])
        made = {"sigma": 0.5, "n": 10, "n0": 5, "alpha": 0.001, "dataset": "digits", **settings}
        (folder / SETTINGS_FILENAME).write_text(json.dumps(made))
        return str(folder)

    def a_file(self) -> Path:
        path = self.tmp / "a-file"
        path.write_text("not a folder")
        return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _already_a_sweep(inputs: Inputs) -> list[str]:
    (inputs.tmp / "results").mkdir()
    (inputs.tmp / "results" / "sweep.json").write_text("{}")
    return inputs.sweep()


# (name, how to make the command, a fragment the error line must hold)
CASES: list[tuple[str, Callable[[Inputs], list[str]], str]] = [
    # --- what only loading the models and data shows: a dry run checks it too
    ("models-folder-missing", lambda i: i.sweep(base={"models": str(i.tmp / "nope")}),
     "has no manifest.json"),
    ("unknown-dataset", lambda i: i.sweep(base={"dataset": "imagenet2"}),
     "unknown dataset 'imagenet2'; allowed:"),
    ("searched-sigma-beyond-schedule",
     lambda i: i.sweep(search={"sigma": {"uniform": [0.25, 200.0]}}),
     "search.sigma: 200 is beyond the denoiser's schedule"),
    ("base-sigma-beyond-schedule", lambda i: i.sweep(base={"sigma": 100}),
     "sigma 100.0 is beyond the denoiser's schedule"),
    ("threshold-searched-under-denoised-ce",
     lambda i: i.sweep(base={"method": "denoised_ce"},
                       search={"confidence_threshold": {"choice": [0.5, "argmax"]}}),
     "search.confidence_threshold: searches nothing: every trial runs method denoised_ce"),
    # --- the sweep file
    ("sweep-file-missing", lambda i: ["sweep", str(i.tmp / "nope.yaml"), "--dry-run"],
     "nope.yaml not found"),
    ("sweep-file-not-yaml",
     lambda i: ["sweep", str(_write(i.tmp / "bad.yaml", "base: [unclosed")), "--dry-run"],
     "is not valid YAML"),
    ("unknown-key", lambda i: i.sweep(schedular={"grace_period": 1}),
     "unknown key 'schedular'; allowed:"),
    ("wrong-type", lambda i: i.sweep(num_trials="two"), "num_trials must be an integer"),
    ("out-of-range", lambda i: i.sweep(search={"lambda": {"uniform": [-1, 2]}}),
     "search.lambda: lambda must be a finite number >= 0"),
    ("empty-search", lambda i: i.sweep(search={}), "search is empty"),
    ("unreachable-tracking-uri",
     lambda i: i.sweep(mlflow={"tracking_uri": "http://127.0.0.1:9", "experiment": "tiny"}),
     "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    ("tracking-store-inside-a-file",
     lambda i: i.sweep(mlflow={"tracking_uri": f"sqlite:///{i.a_file()}/mlflow.db",
                               "experiment": "tiny"}),
     "a-file is a file, not a folder"),
    ("results-dir-inside-a-file", lambda i: i.sweep(results_dir=str(i.a_file() / "results")),
     "a-file/results is inside"),
    ("name-climbs-out", lambda i: i.sweep(name="../escape"), "name must be letters"),
    ("experiment-is-a-path",
     lambda i: i.sweep(mlflow={"tracking_uri": None, "experiment": "/tmp/../escape"}),
     "mlflow.experiment must be letters"),
    ("resume-without-a-sweep", lambda i: i.sweep("--resume"), "nothing to resume"),
    ("results-dir-holds-a-sweep", _already_a_sweep, "already holds a sweep: pass --resume"),
    # --- --set
    ("set-wrong-type", lambda i: i.sweep("--set", "num_trials=many"),
     "num_trials must be an integer, got 'many'"),
    ("set-duplicated-key", lambda i: i.sweep("--set", "lambda=1", "--set", "lambda=2"),
     "--set lambda: given more than once"),
    ("set-one-setting-spelt-twice", lambda i: i.sweep("--set", "lr=1e-3", "--set", "base.lr=2e-3"),
     "--set base.lr: given more than once (also as lr)"),
    ("set-unknown-nested-key", lambda i: i.sweep("--set", "scheduler.grace=1"),
     "unknown key 'scheduler.grace'"),
    ("set-unknown-base-nested-key", lambda i: i.sweep("--set", "base.certify.speed=2"),
     "unknown key certify.speed"),
    ("train-set-duplicated-key", lambda i: i.train("lambda=1", "lambda=2"),
     "--set lambda: given more than once"),
    ("pretrain-set-duplicated-key",
     lambda i: ["pretrain", "--out", str(i.tmp / "out"), "--set", "classifier.epochs=1",
                "--set", "classifier.epochs=2"],
     "--set classifier.epochs: given more than once"),
    # --- an ImageFolder tree
    ("imagefolder-non-image-file",
     lambda i: i.folder_sweep(lambda tree: _write(tree / "train" / "cross" / "notes.txt", "x")),
     "notes.txt is not an image"),
    ("imagefolder-unreadable-image",
     lambda i: i.folder_sweep(
         lambda tree: (tree / "train" / "circle" / "00.png").write_bytes(b"\x89PNG no")),
     "00.png cannot be read"),
    ("imagefolder-class-missing-from-test",
     lambda i: i.folder_sweep(lambda tree: shutil.rmtree(tree / "val" / "stripes")),
     "must hold the training split's classes: no folder for stripes"),
    # --- models, data and checkpoints
    ("certify-models-missing",
     lambda i: ["certify", "--models", str(i.tmp / "nope"), *QUICK_CERTIFY,
                "--out", str(i.tmp / "run")],
     "has no manifest.json"),
    ("certify-data-missing",
     lambda i: i.certify("--dataset", "fashion-mnist", "--data-root", str(i.tmp)),
     "Fashion-MNIST not found in"),
    ("certify-out-inside-a-file",
     lambda i: ["certify", "--models", str(i.models), *QUICK_CERTIFY,
                "--out", str(i.a_file() / "run")],
     "--out: "),
    ("certify-draws-dir-inside-a-file",
     lambda i: i.certify("--draws-dir", str(i.a_file() / "draws")), "--draws-dir: "),
    ("certify-draws-dir-with-compile",
     lambda i: i.certify("--draws-dir", str(i.tmp / "draws"), "--compile"),
     "draws_dir: from stored draws only the classifier runs, so compile must be false"),
    ("train-draws-dir-inside-a-file",
     lambda i: i.train(f"certify.draws_dir={i.a_file() / 'draws'}"), "certify.draws_dir: "),
    ("sweep-final-draws-dir-with-compile",
     lambda i: i.sweep("--set", f"certify.final.draws_dir={i.tmp / 'draws'}",
                       "--set", "certify.final.compile=true"),
     "certify.final.draws_dir: from stored draws only the classifier runs"),
    ("train-out-inside-a-file",
     lambda i: [*i.train(), "--out", str(i.a_file() / "out")], "--out: "),
    ("pretrain-out-inside-a-file",
     lambda i: ["pretrain", "--dataset", "digits", "--out", str(i.a_file() / "out"),
                "--quiet", "--set", "classifier.model_args={patch_size: 4}"],
     "--out: "),
    ("analyze-a-file-that-is-not-records",
     lambda i: ["analyze", str(_write_bytes(i.tmp / "plot.png", b"\x89PNG\r\n\x1a\n"))],
     "plot.png is not a records file"),
    ("analyze-pair-of-other-images",
     lambda i: ["analyze", i.records("a"), i.records("b", images=4)],
     "certify different images: "),
    ("analyze-pair-of-other-settings",
     lambda i: ["analyze", i.records("a"), i.records("b", sigma=0.25)],
     "cannot pair records made with other settings (sigma 0.5 in "),
    ("analyze-pair-of-other-datasets",
     lambda i: ["analyze", i.records("a"), i.records("b", dataset="fashion-mnist")],
     "they certify images of digits test and fashion-mnist test"),
    ("analyze-pair-without-settings",
     lambda i: ["analyze", i.records("a"), str(_write(i.tmp / "bare.tsv", RECORDS_HEADER + "\n"))],
     "bare.tsv has no settings.json beside it"),
    ("checkpoint-truncated", lambda i: i.checkpoint("truncated"),
     "has no readable trained.safetensors"),
    ("checkpoint-of-another-architecture", lambda i: i.checkpoint("wider"),
     "does not fit this classifier"),
    ("checkpoint-without-its-config", lambda i: i.checkpoint("no-config"),
     "is not a cadis checkpoint (no finetune.json)"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_classifier_dir) -> Path:
    """Bad checkpoints of the tiny classifier: truncated weights, one of a wider ViT, and one
    without its ``finetune.json``."""
    from cadis.finetuning.checkpoint import FINETUNE_CONFIG, TRAINED_WEIGHTS, save_trained
    from cadis.finetuning.lora import FinetuneConfig, apply_finetuning
    from cadis.models.classifier import load_classifier
    from tests.conftest import TINY_VIT_ARGS

    root = tmp_path_factory.mktemp("checkpoints")
    config = FinetuneConfig()
    save_trained(apply_finetuning(load_classifier(str(tiny_classifier_dir)), config),
                 root / "truncated", config, {})
    weights = root / "truncated" / TRAINED_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    wider = load_classifier("vit_tiny_patch16_224", num_classes=10,
                            **{**TINY_VIT_ARGS, "embed_dim": 32})
    save_trained(apply_finetuning(wider, config), root / "wider", config, {})
    save_trained(apply_finetuning(load_classifier(str(tiny_classifier_dir)), config),
                 root / "no-config", config, {})
    (root / "no-config" / FINETUNE_CONFIG).unlink()
    return root


def snapshot(root: Path) -> dict[str, int]:
    """Every path below ``root`` with its size (-1 for a folder)."""
    return {str(path.relative_to(root)): path.stat().st_size if path.is_file() else -1
            for path in root.rglob("*")}


def test_the_battery_has_at_least_25_distinct_cases():
    names = [name for name, _, _ in CASES]
    assert len(names) == len(set(names)) >= 25


@pytest.mark.parametrize("make, fragment", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_two_and_leaves_no_trace(make, fragment, tiny_models_dir,
                                                            checkpoints, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.chdir(tmp_path)  # a default store or results folder would land here
    inputs = Inputs(tmp_path, tiny_models_dir, checkpoints)
    args = make(inputs)
    before = snapshot(tmp_path)
    code = main(args)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("cadis: error: ")]
    assert code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in out + err
    assert snapshot(tmp_path) == before


def test_the_installed_entry_point_exits_two_with_one_line(tmp_path):
    # The same through the process a user starts: the exit code reaches the shell.
    sweep = tiny_sweep(tmp_path / "no-models", tmp_path)
    path = _write(tmp_path / "sweep.yaml", yaml.safe_dump(sweep))
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "cadis", "sweep", str(path), "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"cadis: error: models directory {tmp_path / 'no-models'}"
                                        " not found or has no manifest.json (make one with "
                                        "`cadis pretrain`)"]
    assert snapshot(tmp_path) == before

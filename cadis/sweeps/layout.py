"""The layout of a sweep's ``results_dir``, shared by the driver, the trials and the MLflow
writer, and typed readers of the two records the sweep keeps there (:class:`SweepState`,
:class:`TrainedTrial`)::

    sweep.json        the parent run, the tracking URI, the stage, the stored draws, the
                      resolved sweep (what --resume checks) and, once done, the chosen trial
    sweep.yaml        the sweep file as given
    optuna.db         Optuna's study (optuna-dashboard sqlite:///.../optuna.db)
    tune/             Tune's experiment (Tuner.restore reads it)
    train/<trial>/    each trial's Ray Train run and checkpoints
    draws/            the denoised draws of the rank stage and the proxy, made once (unless
                      draws_dir puts them elsewhere)
    figures/          the sweep's figures (cadis.sweeps.figures), also on the parent run
    trials/<trial>/trained.json   the trial's last checkpoint and config
    trials/<trial>/failure.txt    why the trial failed, when a retry cannot change it
    trials/<trial>/rank/     the rank stage (validation): records.tsv, summary.json, plot
    trials/<trial>/certify/  the final stage (test), for finalists: the same files
    trials/<trial>/race/block-<k>/  the racing stage's k-th further block of validation
                      images (k >= 1; block 0 is the rank stage's): the same files
    race/race.json    the race's record: each look, why it stopped, the finalists, the
                      validation images that decided each trial (cadis.sweeps.racing)
    trials/<trial>/seeds/<s>/  a finalist retrained with training seed s (certify.final.seeds):
                      its trained.json and certify/ (test, on the same draws)
    train/<trial>-seed<s>/     that retraining's Ray Train run and checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Final, Mapping

from cadis.errors import CadisError
from cadis.files import atomic_write_text

STATE_FILE: Final = "sweep.json"
SWEEP_FILE_COPY: Final = "sweep.yaml"
OPTUNA_DB: Final = "optuna.db"
TUNE_NAME: Final = "tune"
TRAIN_DIR: Final = "train"
TRIALS_DIR: Final = "trials"
CERTIFY_DIR: Final = "certify"
RANK_DIR: Final = "rank"
TRAINED_FILE: Final = "trained.json"
SEEDS_DIR: Final = "seeds"
FAILURE_FILE: Final = "failure.txt"
DRAWS_DIR: Final = "draws"
RACE_DIR: Final = "race"
RACE_FILE: Final = "race.json"
# The per-epoch time axis of ASHA and MLflow's step: an epoch survives resume, Tune's
# iteration count does not.
EPOCH: Final = "epoch"
# A trial id names a folder under results_dir. Tune's ids fit this; an id that does not (one
# read back from an edited MLflow tag, say) could climb out of the results folder.
TRIAL_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def trial_folder(results: str | Path, trial_id: str) -> Path:
    """``results/trials/<trial_id>``; :class:`CadisError` for an id that is not one plain
    folder name (a ``/``, a leading ``.``, so no ``..``): nothing is written outside
    ``results``."""
    if not isinstance(trial_id, str) or not TRIAL_ID_PATTERN.fullmatch(trial_id):
        raise CadisError(f"trial id {trial_id!r} is not a plain folder name (letters, digits, "
                         f"'.', '_', '-'): refusing to write outside {results}")
    return Path(results) / TRIALS_DIR / trial_id


def trial_certify_dir(results: str | Path, trial_id: str) -> Path:
    """Where a finalist's final stage (test) writes its records, summary and plot."""
    return trial_folder(results, trial_id) / CERTIFY_DIR


def trial_rank_dir(results: str | Path, trial_id: str) -> Path:
    """Where a trial's rank stage (validation) writes its records, summary and plot."""
    return trial_folder(results, trial_id) / RANK_DIR


def trial_seed_folder(results: str | Path, trial_id: str, train_seed: int) -> Path:
    """Where the final stage keeps a finalist retrained with ``train_seed``: its
    :data:`TRAINED_FILE` and its test records in :data:`CERTIFY_DIR`."""
    return trial_folder(results, trial_id) / SEEDS_DIR / str(int(train_seed))


def seed_run_name(trial_id: str, train_seed: int) -> str:
    """The Ray Train run (under ``results/train``) of a finalist retrained with
    ``train_seed``: named so that a resumed final stage resumes it."""
    return f"{trial_id}-seed{int(train_seed)}"


def trial_race_block_dir(results: str | Path, trial_id: str, block: int) -> Path:
    """Where the racing stage writes a trial's records of its ``block``-th further block of
    validation images (``block`` >= 1)."""
    return trial_folder(results, trial_id) / RACE_DIR / f"block-{int(block)}"


def race_file(results: str | Path) -> Path:
    """The race's record (:mod:`cadis.sweeps.racing`)."""
    return Path(results) / RACE_DIR / RACE_FILE


def race_finalists(results: str | Path) -> list[str] | None:
    """The finalists the race left, leader first; None where no race ran (it was off, or the
    sweep is older than racing): the final stage then takes the top_k by rank."""
    path = race_file(results)
    if not path.is_file():
        return None
    return list(_read_json_object(path, ("finalists",), "race record")["finalists"])


def trained_file(results: str | Path, trial_id: str) -> Path:
    """Where a trained trial names its last checkpoint and config."""
    return trial_folder(results, trial_id) / TRAINED_FILE


def trial_failure_file(results: str | Path, trial_id: str) -> Path:
    """Where a trial that failed deterministically keeps its reason, for its retries."""
    return trial_folder(results, trial_id) / FAILURE_FILE


def _read_json_object(path: Path, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """The JSON object in ``path`` holding ``keys``; a one-line :class:`CadisError` when the
    file is missing, not JSON, or not such an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CadisError(f"{path} does not exist: no {what} there") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CadisError(f"{path} is not a readable {what} ({type(error).__name__}: "
                         f"{error})") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise CadisError(f"{path} is not a {what} (it lacks {', '.join(missing)})")
    return data


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


# What sweep.json names each field of SweepState, in the order it is written: the names of
# sweeps already on disk, which --resume reads.
STATE_KEYS: Final = {"parent_run_id": "parent_run_id", "experiment_id": "experiment_id",
                     "tracking_uri": "tracking_uri", "sweep": "sweep", "stage": "stage",
                     "draw_stores": "stores", "warm_start": "warm_start",
                     "chosen_trial": "chosen_trial"}
# The keys every sweep.json has had since the draws were stored (warm_start and chosen_trial
# came later).
STATE_REQUIRED_KEYS: Final = ("parent_run_id", "experiment_id", "tracking_uri", "sweep",
                              "stage", "stores")
# Fields written only once they hold a value: a sweep not yet done has chosen nothing.
WRITTEN_WHEN_SET: Final = ("chosen_trial",)


@dataclasses.dataclass(frozen=True)
class SweepState:
    """``sweep.json``: where a sweep stands, written at each stage so that ``--resume``
    continues from it. The stage machine replaces it (:func:`dataclasses.replace`) and writes
    it again; the file's keys are those of sweeps already on disk."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    # The resolved sweep as plain data (:func:`cadis.sweeps.resume.sweep_fingerprint`).
    sweep: dict[str, Any]
    stage: str
    # The sweep's stored draws by role (their folder and what building them cost); on disk
    # under "stores".
    draw_stores: dict[str, dict[str, Any]]
    # Where a warm-started search began (``WarmStart.record``); None for a cold start.
    warm_start: dict[str, Any] | None = None
    # The trial the sweep chose, written when it is done (its test records are
    # trial_certify_dir's); None before, and in sweeps that finished before it was kept.
    chosen_trial: str | None = None

    @classmethod
    def read(cls, results: str | Path) -> SweepState:
        """The state in ``results/sweep.json``; :class:`CadisError` when it is missing or
        broken."""
        data = _read_json_object(Path(results) / STATE_FILE, STATE_REQUIRED_KEYS,
                                 "sweep's state")
        return cls(**{field: data[key] for field, key in STATE_KEYS.items() if key in data})

    def write(self, results: str | Path) -> None:
        """Write ``results/sweep.json`` whole (a reader never sees half of it); the chosen
        trial only once there is one."""
        _write_json(Path(results) / STATE_FILE,
                    {key: getattr(self, field) for field, key in STATE_KEYS.items()
                     if field not in WRITTEN_WHEN_SET or getattr(self, field) is not None})

    def store_folders(self) -> dict[str, str]:
        """The folder of each stored draws' role (what a trial is given)."""
        return {role: info["folder"] for role, info in self.draw_stores.items()}


def sweep_origin(results: str | Path) -> tuple[str, str]:
    """The parent run id and tracking URI that ``results/sweep.json`` names: all that a warm
    start needs of an earlier sweep (:class:`CadisError` when the file lacks them)."""
    data = _read_json_object(Path(results) / STATE_FILE, ("parent_run_id", "tracking_uri"),
                             "sweep's state")
    return data["parent_run_id"], data["tracking_uri"]


@dataclasses.dataclass(frozen=True)
class TrainedTrial:
    """``trials/<trial>/trained.json``: a trained trial's last checkpoint and the config it
    was trained with (:meth:`cadis.finetuning.config.TrainConfig.to_dict`): what the final
    stage certifies."""

    checkpoint: str
    config: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path) -> TrainedTrial:
        """The trained trial in ``path`` (:func:`trained_file`); :class:`CadisError` when it
        is missing or broken."""
        data = _read_json_object(Path(path), ("checkpoint", "config"), "trained trial")
        return cls(data["checkpoint"], data["config"])

    def write(self, path: str | Path) -> None:
        """Write ``path`` whole, making its trial's folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"checkpoint": self.checkpoint, "config": self.config})

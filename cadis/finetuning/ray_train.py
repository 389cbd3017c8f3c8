"""The fine-tuning loop in Ray Train workers, and the one place that builds its TorchTrainer
(for ``cadis train --workers N`` and for every sweep trial alike).

Ray is imported inside the functions: importing this module costs nothing until a run starts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from cadis.finetuning.config import TrainConfig, from_mapping, portable_config
from cadis.finetuning.loop import train_loop
from cadis.finetuning.train_failures import deterministic_cause, stop_on_deterministic_failure

RAY_RUN_NAME: Final = "train"
# Worker failures (a lost node, say) restart the run from the last checkpoint this often; a
# worker that raised a CadisError is not restarted (see deterministic_cause).
RAY_MAX_FAILURES: Final = 2
# The last checkpoint is what certification and resume read; each holds every epoch's
# metrics, so older ones are not needed (a sweep of many trials must not fill the disk).
CHECKPOINTS_TO_KEEP: Final = 1
# Train's controller looks at its workers this often (Ray's default: 2 s); a finished run is
# seen, and its result returned, only at the next look, so each trial waited a second on
# average for nothing. Train passes this on to its controller too.
HEALTH_CHECK_INTERVAL_ENV: Final = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S: Final = 0.5
# Train gives a worker group 60 s to start, then retries; on a loaded machine starting a
# worker (importing torch) took longer, and each retry left its placement group reserved
# until no worker fitted (seen with Ray 2.60). Train passes this on to its controller.
WORKER_GROUP_START_TIMEOUT_ENV: Final = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_START_TIMEOUT_S: Final = 600
# Ray's own default without an address joins the cluster that the machine's last `ray start`
# named in <temp dir>/ray_current_cluster, which `ray stop` leaves behind: a run on a machine
# where such a head has died waits minutes to connect to nothing. cadis joins a cluster only
# when RAY_ADDRESS names it (as `ray job submit` does for its jobs); without, Ray's "local".
PRIVATE_RAY: Final = "local"


def init_ray(**options: Any) -> None:
    """Connect this process to Ray: the cluster ``$RAY_ADDRESS`` names, else a private one
    started for it, never one found on the machine unnamed (see :data:`PRIVATE_RAY`).
    ``options`` go to ``ray.init``."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or PRIVATE_RAY, **options)


class RaySession:
    """Inside a Ray Train worker: DDP, distributed sampling and reporting through Ray."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = None if checkpoint_dir is None else \
            ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint the run resumes from or, once this worker has reported one, the
        last it reported, as persisted in the run's storage."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        # Local storage: the checkpoint's path is a directory on this machine.
        return None if checkpoint is None else Path(checkpoint.path)

    def gather(self, value: Any) -> list[Any]:
        """Every worker's ``value``, in rank order (a collective: all workers call it)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed

        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered


def ray_train_worker(config_dict: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer: the same loop inside a Ray worker. Its
    rank-0 worker writes progress lines (a worker's output is a log, never a terminal), which
    Ray forwards to the driver and the job's log, prefixed by the worker."""
    train_loop(from_mapping(config_dict), RaySession())


def build_trainer(config: TrainConfig, name: str, storage: Path, *, cpus_per_worker: float,
                  gpus_per_worker: float, callbacks: Sequence[Any] = (),
                  worker: Callable[[dict[str, Any]], None] = ray_train_worker) -> Any:
    """The TorchTrainer of one fine-tuning run: ``config.workers`` workers of
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs each (a GPU makes ``device: auto``
    CUDA), each running ``worker`` on the config's mapping (the loop, or a sweep trial's
    loop and rank stage), its checkpoints under ``storage/name``. A run of the same name and
    storage resumes from its last checkpoint: name runs so that only the same run shares one."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, str(WORKER_GROUP_START_TIMEOUT_S))
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, str(HEALTH_CHECK_INTERVAL_S))
    config = portable_config(config)
    per_worker = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        per_worker["GPU"] = gpus_per_worker
        if config.device == "auto":
            config.device = "cuda"
    return TorchTrainer(
        worker, train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             callbacks=[stop_on_deterministic_failure(), *callbacks],
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
                             failure_config=FailureConfig(max_failures=RAY_MAX_FAILURES)))


def fit_trainer(trainer: Any) -> Any:
    """``trainer.fit()``'s result; a run that failed for a :class:`CadisError` raises that
    error itself (one line for the command line and for Tune's reason), not Ray's wrapper."""
    try:
        return trainer.fit()
    except Exception as error:
        cause = deterministic_cause(error)
        if cause is None:
            raise
        raise cause from None


def fit_with_ray(config: TrainConfig, out_dir: Path, resume: bool) -> Path:
    """``cadis train`` on Ray Train (a GPU per worker where the cluster has one for each);
    returns the last checkpoint's folder."""
    import ray

    if not ray.is_initialized():
        init_ray(log_to_driver=True)
    wants_gpu = config.device == "cuda" or (
        config.device == "auto" and ray.cluster_resources().get("GPU", 0) >= config.workers)
    storage = (out_dir / "ray").absolute()
    if not resume:
        # The same run name under the same storage resumes: a fresh run must start clean.
        shutil.rmtree(storage / RAY_RUN_NAME, ignore_errors=True)
    trainer = build_trainer(config, RAY_RUN_NAME, storage,
                            cpus_per_worker=config.cpus_per_worker,
                            gpus_per_worker=1.0 if wants_gpu else 0.0)
    return Path(fit_trainer(trainer).checkpoint.path)

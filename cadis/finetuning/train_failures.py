"""Which failures of a Train run to retry: a :class:`CadisError` raised in a worker is
deterministic and ends the run at once; anything else Ray retries as it does.

Light on purpose (no torch, no cadis config): Train's controller process unpickles the
callback made here, and every import here is one more each trial's controller pays for.
"""

from __future__ import annotations

from typing import Any, Final

from cadis.errors import CadisError

# Where Ray keeps the error a failure carries: a Train ControllerError's failure, a
# WorkerGroupError's per-worker errors, the user exception inside a worker's traceback
# wrapper (Ray 2.60), and Python's own chaining.
RAY_ERROR_LINKS: Final = ("controller_failure", "worker_failures", "_base_exc", "__cause__")


def deterministic_cause(error: BaseException) -> CadisError | None:
    """The :class:`CadisError` a failed Train run carries, seen through Ray's wrappers, or
    None. A CadisError is deterministic: a bad value, a loss gone non-finite, data that does
    not fit; the same config on the same data raises it again, so retrying it only repeats the
    failure (six times over, with Train's and Tune's retries). Anything else (a lost node, a
    killed worker, a full disk) may pass and is retried as Ray does."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        item = pending.pop()
        if isinstance(item, CadisError):
            return item
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        for link in RAY_ERROR_LINKS:
            linked = getattr(item, link, None)
            pending.extend(linked.values() if isinstance(linked, dict) else [linked])
    return None


def stop_on_deterministic_failure() -> Any:
    """A Train callback (run in the Train controller) that ends the run without restarting
    its workers when a worker raised a :class:`CadisError`: the callback's error makes Train
    raise rather than retry (its failure policy retries worker errors, not a controller's),
    and the run's error carries that CadisError (:func:`deterministic_cause` finds it)."""
    from ray.train import UserCallback

    class StopOnDeterministicFailure(UserCallback):
        def after_exception(self, run_context: Any,
                            worker_exceptions: dict[int, Exception]) -> None:
            for worker_error in worker_exceptions.values():
                cause = deterministic_cause(worker_error)
                if cause is not None:
                    raise cause

    return StopOnDeterministicFailure()

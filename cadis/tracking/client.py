"""The one MLflow client that writes a sweep: every call outlasts a short outage of the
tracking server, and params and metrics go in batches MLflow accepts.

MLflow and ``requests`` are imported when a client is made or an error is read, never at
module level.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Final, Mapping, Sequence

from cadis.errors import CadisError, first_line
from cadis.files import exclusive_lock
from cadis.tracking.server import TRACKING_RETRY_ENV, sqlite_path, tracking_retry_s

#: The waits between two attempts to reach an unreachable tracking server double from the
#: first to the last, for up to tracking_retry_s() seconds in all.
RETRY_FIRST_WAIT_S: Final = 1.0
RETRY_MAX_WAIT_S: Final = 15.0
#: MLflow's client retries a failed request itself (MLflow 3.17: 7 retries, waits doubling
#: from 2 s to 120 s, about 4 minutes, a warning each): the bound and the lines are the
#: driver's, so MLflow tries once unless its retries are set in the environment.
MLFLOW_RETRIES_ENV: Final = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
#: MLflow's limits per ``log_batch``.
MAX_PARAMS_PER_BATCH: Final = 100
MAX_METRICS_PER_BATCH: Final = 1000


class TrackingServerUnreachable(CadisError):
    """The tracking server did not answer within the retry bound: the sweep ends here."""


class PatientClient:
    """An ``MlflowClient`` whose every call outlasts a short outage of the tracking server.

    A call that does not reach the server (a refused or broken connection, a timeout, HTTP
    429 or 5xx: a ``requests`` error under MLflow's) is made again, the waits doubling from
    :data:`RETRY_FIRST_WAIT_S` to :data:`RETRY_MAX_WAIT_S`, for up to ``retry_s`` seconds
    (:func:`~cadis.tracking.server.tracking_retry_s` unless given); one line says that the
    server went away, one that it is back. Any other error is the server's answer, raised at
    once. Past the bound the call raises :class:`TrackingServerUnreachable`, and so does
    every later call, without waiting again: no write is dropped unsaid, the sweep ends
    (resumable).
    """

    def __init__(self, uri: str, retry_s: float | None = None) -> None:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault(MLFLOW_RETRIES_ENV, "0")
        self.uri = uri
        self.retry_s = tracking_retry_s() if retry_s is None else retry_s
        database = sqlite_path(uri)
        if database is None:
            self._client = MlflowClient(uri)
        else:
            # MLflow creates and migrates a SQLite store's tables as the client is made; two
            # sweeps doing it at once on a new store race ("table experiments already
            # exists", alembic's "expected to match one row") and one fails. The first to
            # take the lock creates them, the others find them made.
            with exclusive_lock(database.parent / f".{database.name}.lock"):
                self._client = MlflowClient(uri)
        self._gave_up: TrackingServerUnreachable | None = None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        return functools.partial(self._call, attribute) if callable(attribute) else attribute

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._gave_up is not None:
            raise self._gave_up
        started = time.monotonic()
        wait = RETRY_FIRST_WAIT_S
        away = False
        while True:
            try:
                result = method(*args, **kwargs)
                break
            except Exception as error:  # noqa: BLE001 - only an outage is retried, below
                reason = _outage_reason(error)
                waited = time.monotonic() - started
                if reason is None:
                    raise
                if waited >= self.retry_s:
                    self._gave_up = TrackingServerUnreachable(
                        f"the MLflow tracking store {self.uri} is unreachable ({reason}; "
                        f"retried for {waited:.0f} s, {TRACKING_RETRY_ENV} sets how long)")
                    raise self._gave_up from None
                if not away:
                    away = True
                    print(f"mlflow: the tracking store {self.uri} is unreachable ({reason}); "
                          f"retrying for up to {self.retry_s:g} s", file=sys.stderr, flush=True)
            time.sleep(min(wait, self.retry_s - waited))
            wait = min(2 * wait, RETRY_MAX_WAIT_S)
        if away:
            print(f"mlflow: the tracking store {self.uri} is back after "
                  f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        return result


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def tracking_given_up(error: BaseException) -> TrackingServerUnreachable | None:
    """The :class:`TrackingServerUnreachable` in ``error``'s chain, if any (Tune raises its
    own error while handling a callback's)."""
    return next((item for item in exception_chain(error)
                 if isinstance(item, TrackingServerUnreachable)), None)


def _outage_reason(error: BaseException) -> str | None:
    """Why the server was not reached, when ``error`` is an HTTP failure (a ``requests``
    error in its chain): the system's words where a socket error is in the chain or its
    arguments (``Connection refused``; urllib3 keeps a reset connection's error as an
    argument), else the innermost error's first line; None for an answer of the server."""
    import requests

    chain = exception_chain(error)
    if not any(isinstance(item, requests.exceptions.RequestException) for item in chain):
        return None
    sockets = [item for link in chain for item in (link, *link.args)
               if isinstance(item, OSError) and item.strerror]
    return sockets[-1].strerror if sockets else first_line(chain[-1])


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Every param of ``params`` (values as text) on the run, in batches MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int,
                timestamp_ms: int | None = None) -> None:
    """Every metric of ``metrics`` at ``step`` on the run, in batches MLflow accepts, stamped
    ``timestamp_ms`` (now, unless given)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    items = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
    for start in range(0, len(items), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])


def log_files(client: Any, run_id: str, folder: Path, names: Sequence[str],
              artifact_path: str | None = None) -> None:
    """Each file of ``names`` that ``folder`` holds, as an artifact of the run (under
    ``artifact_path``); a name the folder lacks is passed over."""
    for name in names:
        if (folder / name).is_file():
            client.log_artifact(run_id, str(folder / name), artifact_path)

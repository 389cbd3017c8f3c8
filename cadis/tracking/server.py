"""Where a sweep's MLflow runs are kept: the tracking URI, whether it can take runs before any
work starts, and how long the driver waits for it once a sweep runs.

A URI is either an MLflow tracking server (``http://HOST:PORT``) or a local SQLite file
(``sqlite:///PATH``), with the file :data:`DEFAULT_TRACKING_DB` when neither the sweep nor
``$MLFLOW_TRACKING_URI`` names one. Neither MLflow nor torch is imported here.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from cadis.errors import CadisError
from cadis.files import check_creatable_folder
from cadis.validation import non_negative_float

SQLITE_SCHEME: Final = "sqlite:///"
TRACKING_URI_ENV: Final = "MLFLOW_TRACKING_URI"
#: One local SQLite file for every sweep, so that one `mlflow ui` and `cadis compare` see
#: them all.
DEFAULT_TRACKING_DB: Final = Path("runs/sweeps/mlflow.db")
ARTIFACTS_DIR: Final = "mlartifacts"
HEALTH_TIMEOUT_SECONDS: Final = 5.0
#: How long a sweep's driver waits for an unreachable tracking server (a server restarted, a
#: network cut) before the sweep ends, resumable; the variable changes it.
TRACKING_RETRY_S: Final = 300.0
TRACKING_RETRY_ENV: Final = "CADIS_TRACKING_RETRY_S"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the local SQLite file :data:`DEFAULT_TRACKING_DB` (made
    absolute here: a Ray trial runs in another working directory)."""
    return os.environ.get(TRACKING_URI_ENV) or f"{SQLITE_SCHEME}{DEFAULT_TRACKING_DB.resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URI; None for any other URI."""
    return Path(uri[len(SQLITE_SCHEME):]) if uri.startswith(SQLITE_SCHEME) else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite file (MLflow's default is
    ``./mlruns`` of whatever directory a process runs in); a server's own choice otherwise."""
    database = sqlite_path(uri)
    if database is not None:
        return (database.parent / ARTIFACTS_DIR).resolve().as_uri()
    return None


def check_tracking_uri(uri: str, create: bool = True) -> None:
    """Raise :class:`CadisError` (one line) unless ``uri`` can take runs: an HTTP server must
    answer ``/health`` within :data:`HEALTH_TIMEOUT_SECONDS`; a SQLite file's folder must be
    creatable (and is created, unless ``create`` is false: a dry run leaves no trace).
    Checked before a sweep starts any trial: MLflow's own client retries an unreachable
    server for minutes."""
    database = sqlite_path(uri)
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=HEALTH_TIMEOUT_SECONDS) as response:
                if response.status != 200:
                    raise CadisError(f"MLflow tracking server {uri} answered {response.status} "
                                     f"on /health")
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CadisError(f"MLflow tracking server {uri} is unreachable ({reason}); start "
                             f"it (cluster/cadis-cluster start) or name another store"
                             ) from None
    elif database is not None:
        folder = database.parent
        if not create:
            check_creatable_folder(folder, f"MLflow store {uri}")
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CadisError(f"MLflow store {uri}: cannot create {folder} ({error.strerror})"
                             ) from None
    elif "://" not in uri and not uri.startswith(("databricks", "file:")):
        raise CadisError(f"mlflow.tracking_uri {uri!r} is not a URI; use http://HOST:PORT or "
                         f"sqlite:///PATH")


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI a reader opens: ``uri``, else :func:`default_tracking_uri`; raises
    :class:`CadisError` for a SQLite file that does not exist (reading must not create one)
    or an unreachable server."""
    uri = uri or default_tracking_uri()
    database = sqlite_path(uri)
    if database is None:
        check_tracking_uri(uri)
    elif not database.is_file():
        raise CadisError(f"no MLflow store at {database}; run a sweep first or pass "
                         f"--tracking-uri")
    return uri


def tracking_retry_s() -> float:
    """Seconds to wait for an unreachable tracking server: ``$CADIS_TRACKING_RETRY_S`` when
    set (a number >= 0), else :data:`TRACKING_RETRY_S`."""
    text = os.environ.get(TRACKING_RETRY_ENV, "").strip()
    if not text:
        return TRACKING_RETRY_S
    try:
        value: object = float(text)
    except ValueError:
        value = text
    return non_negative_float(value, TRACKING_RETRY_ENV)

"""cluster/: the local multi-node cluster script, the cluster-launcher config, the KubeRay
manifests; and, marked slow, a real local cluster that runs a Ray job and an MLflow server.

``start_local_cluster`` / ``stop_local_cluster`` and the ``local_cluster`` fixture are written
to move to conftest.py unchanged when other tests need a cluster.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCRIPT = CLUSTER / "cadis-cluster"
LAUNCHER = CLUSTER / "launcher.yaml"
KUBERAY = CLUSTER / "kuberay"
VENV_BIN = Path(sys.prefix) / "bin"      # the interpreter running the tests: the cluster's too
RAY_VERSION = "2.60.0"


# ------------------------------------------------------------------------------ local cluster

@dataclass(frozen=True)
class ClusterInfo:
    """A running ``cluster/cadis-cluster`` cluster.

    ``env`` is a complete environment for clients and for ``cadis-cluster stop|status``:
    RAY_ADDRESS (the job API), MLFLOW_TRACKING_URI, RAY_AUTH_MODE=disabled, the CADIS_*
    variables naming this cluster's state dir and ports, and PATH with the virtualenv first.
    """

    dashboard_url: str
    mlflow_uri: str
    env: dict[str, str]
    state_dir: Path
    gcs_address: str


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held together, so all distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _base_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")}
    env["CADIS_CLUSTER_DIR"] = str(state_dir)
    env["CADIS_VENV"] = sys.prefix
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_local_cluster(tmp_dir: str | os.PathLike, workers: int = 1,
                        timeout: float = 600) -> ClusterInfo:
    """``cadis-cluster start --workers N`` with ``tmp_dir`` as its state dir (keep it short:
    ``tempfile.mkdtemp(prefix="cc-", dir="/tmp")``) on free ports, so a developer's cluster on
    the default ports is left alone. Raises RuntimeError with the script's output if it fails
    (the script stops what it started; call :func:`stop_local_cluster` anyway)."""
    state = Path(tmp_dir)
    gcs, dashboard, client, mlflow = _free_ports(4)
    env = _base_env(state)
    env.update(CADIS_GCS_PORT=str(gcs), CADIS_DASHBOARD_PORT=str(dashboard),
               CADIS_CLIENT_PORT=str(client), CADIS_MLFLOW_PORT=str(mlflow),
               CADIS_RAY_AUTH="disabled")
    proc = subprocess.run([str(SCRIPT), "start", "--workers", str(workers)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cadis-cluster start exited {proc.returncode}\n"
                           f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    dashboard_url = f"http://127.0.0.1:{dashboard}"
    mlflow_uri = f"http://127.0.0.1:{mlflow}"
    env.update(RAY_ADDRESS=dashboard_url, MLFLOW_TRACKING_URI=mlflow_uri,
               RAY_AUTH_MODE="disabled")
    return ClusterInfo(dashboard_url, mlflow_uri, env, state, f"127.0.0.2:{gcs}")


def stop_local_cluster(cluster: ClusterInfo | str | os.PathLike,
                       timeout: float = 120) -> subprocess.CompletedProcess:
    """``cadis-cluster stop`` for a cluster (or a state dir); safe to call twice."""
    state = cluster.state_dir if isinstance(cluster, ClusterInfo) else Path(cluster)
    return subprocess.run([str(SCRIPT), "stop"], env=_base_env(state), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def local_cluster():
    """A head and one worker node on 127.0.0.2/.3 with an MLflow server, for this module;
    always stopped (and its state dir removed) at the end."""
    missing = [tool for tool in ("setsid", "curl", "pgrep") if shutil.which(tool) is None]
    missing += [str(p) for p in (VENV_BIN / "ray", VENV_BIN / "mlflow") if not p.exists()]
    if missing:
        pytest.skip(f"a local cluster needs {', '.join(missing)}")
    state = tempfile.mkdtemp(prefix="cc-", dir="/tmp")
    try:
        yield start_local_cluster(state)
    finally:
        stop_local_cluster(state)
        shutil.rmtree(state, ignore_errors=True)


def _cluster_processes(state_dir: Path, session_ids: set[int]) -> list[str]:
    """Live processes of a cluster: in one of its sessions/process groups, carrying its tag,
    or naming its state dir on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            pgrp, session = int(fields[2]), int(fields[3])
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if (pgrp in session_ids or session in session_ids
                or f"CADIS_CLUSTER_TAG={state_dir}".encode() in environ
                or str(state_dir) + "/" in cmdline):
            found.append(f"{pid} {cmdline[:150]}")
    return found


# The kernel's tables of TCP sockets (this network namespace) and the LISTEN state's code.
SOCKET_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_LISTEN = "0A"


def _listening_addresses(port: int) -> set[str]:
    """The local addresses that sockets LISTENing on ``port`` are bound to, read from the
    kernel's socket tables (what ``ss -ltn`` shows): ``0.0.0.0`` or ``::`` is every
    interface."""
    found = set()
    for table in SOCKET_TABLES:
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != TCP_LISTEN or int(port_hex, 16) != port:
                continue
            # Each 32-bit word is stored in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1]
                           for i in range(0, len(address), 8))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def test_the_socket_table_reader_sees_a_loopback_and_an_any_listener():
    # What the cluster test below relies on, on sockets of its own.
    with socket.socket() as loopback, socket.socket() as anywhere:
        loopback.bind(("127.0.0.1", 0))
        anywhere.bind(("0.0.0.0", 0))
        loopback.listen()
        anywhere.listen()
        assert _listening_addresses(loopback.getsockname()[1]) == {"127.0.0.1"}
        assert _listening_addresses(anywhere.getsockname()[1]) == {"0.0.0.0"}


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


PROBE = """\
import json, os, sys
import ray
ray.init()
import cadis
print("CLUSTER_PROBE " + json.dumps({
    "alive_nodes": sum(1 for node in ray.nodes() if node["Alive"]),
    "resources": ray.cluster_resources(),
    "cadis": cadis.__file__,
    "prefix": sys.prefix,
    "mlflow": os.environ.get("MLFLOW_TRACKING_URI"),
}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_job_submit_runs_a_sweep_tracked_on_the_mlflow_server(local_cluster, tmp_path,
                                                                  tiny_models_dir):
    """The README's end to end, small: `ray job submit -- cadis sweep` onto the cluster; the
    runs land on its MLflow server (jobs get MLFLOW_TRACKING_URI from the nodes). Stays
    above the test that stops the module's cluster: pytest runs a module's tests in order."""
    from mlflow.tracking import MlflowClient

    from tests.test_sweep import tiny_sweep

    cluster = local_cluster
    workdir = tmp_path / "job"
    workdir.mkdir()
    sweep = tiny_sweep(tiny_models_dir, tmp_path, name="job", mlflow={"experiment": "job"},
                       max_concurrent_trials=1)
    (workdir / "job.yaml").write_text(yaml.safe_dump(sweep))
    job = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address",
                          cluster.dashboard_url, "--working-dir", str(workdir), "--",
                          "cadis", "sweep", "job.yaml"],
                         env=cluster.env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert f"mlflow: {cluster.mlflow_uri} experiment 'job'" in job.stdout
    client = MlflowClient(cluster.mlflow_uri)
    experiment = client.get_experiment_by_name("job")
    runs = client.search_runs([experiment.experiment_id])
    trials = [run for run in runs if run.data.tags.get("cadis.role") == "trial"]
    assert len(runs) == 3 and len(trials) == 2
    assert all(run.info.status in ("FINISHED", "KILLED") for run in runs)
    completed = [run for run in trials if run.data.tags["cadis.outcome"] == "completed"]
    assert completed and all("certified_accuracy_r0.0" in run.data.metrics for run in completed)
    artifacts = {item.path for item in client.list_artifacts(completed[0].info.run_id)}
    assert {"records.tsv", "summary.json", "certified_accuracy.png"} <= artifacts


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_local_cluster_runs_a_job_serves_mlflow_and_stops_clean(local_cluster, tmp_path):
    cluster = local_cluster
    env = cluster.env

    # A job from a working dir holding only the probe: `cadis` can only come from the
    # virtualenv the nodes run (the job's entrypoint gets the raylet's environment).
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "probe.py").write_text(PROBE)
    started = time.monotonic()
    job = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address",
                          cluster.dashboard_url, "--working-dir", str(workdir), "--",
                          "python", "probe.py"],
                         env=env, capture_output=True, text=True, timeout=300)
    job_seconds = time.monotonic() - started
    assert job.returncode == 0, job.stdout + job.stderr
    line = next((ln for ln in job.stdout.splitlines() if ln.startswith("CLUSTER_PROBE ")), None)
    assert line, job.stdout + job.stderr
    probe = json.loads(line.removeprefix("CLUSTER_PROBE "))
    print(f"job: {job_seconds:.1f} s; cluster_resources: {probe['resources']}")
    assert probe["alive_nodes"] == 2
    assert probe["resources"]["node:127.0.0.2"] == 1 and probe["resources"]["node:127.0.0.3"] == 1
    assert Path(probe["cadis"]).resolve().is_relative_to(REPO / "cadis")
    assert Path(probe["prefix"]) == Path(sys.prefix)
    assert probe["mlflow"] == cluster.mlflow_uri      # jobs default to the cluster's server

    # MLflow on loopback.
    with urllib.request.urlopen(cluster.mlflow_uri + "/health", timeout=30) as response:
        assert response.status == 200
    # Every server the script binds listens on loopback only, as the kernel's socket table
    # shows (Ray's own gRPC ports listen on all interfaces: cluster/README.md says so).
    for url in (cluster.dashboard_url, cluster.mlflow_uri):
        addresses = _listening_addresses(int(url.rsplit(":", 1)[1]))
        assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), \
            (url, addresses)

    # status answers; a second start refuses in one line and leaves the cluster running.
    status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy" in status.stdout
    again = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 1
    assert "already running" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    # stop: no process of this cluster survives, and ray_current_cluster is gone.
    ids = {int(f.read_text()) for f in cluster.state_dir.glob("*.pgid")}
    assert len(ids) == 3                               # head, worker, MLflow
    assert _cluster_processes(cluster.state_dir, ids)
    assert (cluster.state_dir / "ray" / "ray_current_cluster").exists()
    started = time.monotonic()
    stopped = stop_local_cluster(cluster)
    print(f"stop: {time.monotonic() - started:.1f} s")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert _cluster_processes(cluster.state_dir, ids) == []
    assert not (cluster.state_dir / "ray" / "ray_current_cluster").exists()
    assert not list(cluster.state_dir.glob("*.pgid"))
    dashboard_port = int(cluster.dashboard_url.rsplit(":", 1)[1])
    mlflow_port = int(cluster.mlflow_uri.rsplit(":", 1)[1])
    assert not _listening(dashboard_port) and not _listening(mlflow_port)


# ------------------------------------------------------------------------------ the script

def _run_script(*args: str, state_dir: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = _base_env(state_dir)
    env.update(extra_env)
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=60)


CONNECT = """\
import ray
from cadis.finetuning.ray_train import init_ray
init_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)
print("CONNECTED", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


@pytest.mark.slow
def test_without_ray_address_cadis_starts_its_own_ray_not_the_one_ray_start_left():
    # `ray stop` leaves <temp dir>/ray_current_cluster behind; Ray's default would try to join
    # the dead head it names and wait minutes. Ray's temp dir here is a fresh one of the test's
    # (short: Ray's socket paths must fit 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="cadis-ray-", dir="/tmp"))
    try:
        (root / "ray").mkdir()
        (root / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
        env = {**os.environ, "RAY_TMPDIR": str(root)}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([sys.executable, "-c", CONNECT], env=env, cwd=REPO, text=True,
                              capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        [line] = [line for line in done.stdout.splitlines() if line.startswith("CONNECTED")]
        assert not line.endswith(":9")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_script_is_executable_bash_with_strict_mode():
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_help_names_commands_and_settings(tmp_path):
    result = _run_script("--help", state_dir=tmp_path)
    assert result.returncode == 0
    for word in ("start", "stop", "status", "--workers", "--no-mlflow", "CADIS_CLUSTER_DIR",
                 "CADIS_GCS_PORT", "CADIS_DASHBOARD_PORT", "CADIS_MLFLOW_PORT",
                 "CADIS_RAY_AUTH", "RAY_AUTH_MODE", "127.0.0.2"):
        assert word in result.stdout, word


def test_script_without_a_cluster(tmp_path):
    state = tmp_path / "s"
    assert _run_script("stop", state_dir=state).returncode == 0
    status = _run_script("status", state_dir=state)
    assert status.returncode == 3 and "not running" in status.stdout
    assert _run_script(state_dir=state).returncode == 2             # no command: usage
    assert _run_script("restart", state_dir=state).returncode == 1


def test_script_refuses_bad_arguments_before_starting_anything(tmp_path):
    bad = _run_script("start", "--workers", "two", state_dir=tmp_path / "s")
    assert bad.returncode == 1 and "--workers" in bad.stderr
    unknown = _run_script("start", "--gpus", state_dir=tmp_path / "s")
    assert unknown.returncode == 1 and "unknown argument" in unknown.stderr
    long_dir = Path("/tmp") / ("x" * 40)
    too_long = _run_script("start", state_dir=long_dir)
    assert too_long.returncode == 1 and "too long" in too_long.stderr
    assert not long_dir.exists()
    auth = _run_script("start", state_dir=tmp_path / "s", CADIS_RAY_AUTH="none",
                       CADIS_GCS_PORT=str(_free_ports(1)[0]))
    assert auth.returncode == 1 and "CADIS_RAY_AUTH" in auth.stderr


def test_script_binds_loopback_only():
    text = SCRIPT.read_text()
    assert "--dashboard-host=127.0.0.1" in text
    assert "--host 127.0.0.1" in text                      # MLflow
    assert "HEAD_IP=127.0.0.2" in text
    assert "RAY_AUTH_MODE=disabled" in text and "RAY_AUTH_MODE=token" in text
    for flag in ("--memory=", "--object-store-memory=", "--num-cpus=", "--temp-dir="):
        assert flag in text, flag


# ------------------------------------------------------------------------------ launcher.yaml

def test_script_turns_mlflow_telemetry_off_for_everything_it_starts():
    # Exported before any server or node starts, so every process inherits it.
    text = SCRIPT.read_text()
    exported = text.index("export MLFLOW_DISABLE_TELEMETRY=true")
    assert exported < text.index('"$MLFLOW" server') and exported < text.index('"$RAY" start --head')


def test_launcher_config_has_what_ray_up_requires():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["cluster_name"]
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] and config["provider"]["availability_zone"]
    assert config["auth"]["ssh_user"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node_type in types.items():
        assert node_type["node_config"]["InstanceType"], name
        assert isinstance(node_type["resources"], dict), name
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1, name
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())
    assert any("pip install" in c and "-e /home/ubuntu/cadis" in c
               for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ubuntu/cadis"] == "."
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    mlflow = " ".join(config["head_setup_commands"])
    assert "mlflow server" in mlflow and "--port 5000" in mlflow and "hostname -I" in mlflow


def test_launcher_config_passes_rays_own_schema():
    pytest.importorskip("jsonschema")     # what Ray validates cluster configs with
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(LAUNCHER.read_text())))


# ------------------------------------------------------------------------------ KubeRay

def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert container["resources"]["requests"]


def test_raycluster_manifest():
    docs = _docs(KUBERAY / "raycluster.yaml")
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"])
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert "cadis-shared" not in claims  # shared-volume.yaml holds it (tests/test_manifests.py)


def test_rayjob_manifest():
    (job,) = _docs(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "cadis sweep" in spec["entrypoint"]
    assert "$MLFLOW_TRACKING_URI" in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    submitter_env = {e["name"]: e["value"] for e in
                     spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert submitter_env["MLFLOW_TRACKING_URI"] == runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_mlflow_manifest():
    docs = {d["kind"]: d for d in _docs(KUBERAY / "mlflow.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["command"]
    assert args[:2] == ["mlflow", "server"]
    assert any(a.startswith("--backend-store-uri=sqlite:////") for a in args)
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    uri = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())["spec"]["runtimeEnvYAML"]
    assert docs["Service"]["metadata"]["name"] in uri


def test_nothing_binds_all_interfaces_except_commented_pod_listeners():
    """0.0.0.0 only on a KubeRay/MLflow pod's own interface, each time with a comment saying
    that the pod network is not public; comments (and the README) may mention it freely."""
    offenders = []
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".md"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code, _, comment = line.partition("#")
            if "0.0.0.0" not in code:
                continue
            if path.parent == KUBERAY and path.suffix == ".yaml" and "pod network" in comment:
                continue
            offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_readme_covers_every_file():
    readme = (CLUSTER / "README.md").read_text()
    for name in ("cadis-cluster", "launcher.yaml", "raycluster.yaml", "rayjob.yaml",
                 "shared-volume.yaml", "mlflow.yaml", "Dockerfile", "RAY_AUTH_MODE",
                 "ray job submit", "ray up", "kubectl apply"):
        assert name in readme, name

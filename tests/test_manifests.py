"""The KubeRay manifests as a user applies them: every sequence of ``kubectl apply`` steps the
docs give (each manifest's header comment, each code block of cluster/README.md) defines
every claim, service and secret that the files it applies, and the commands beside them,
refer to. Following a manifest's own steps must not leave a pod Pending on a missing claim."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
README = REPO / "cluster" / "README.md"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))

APPLY = re.compile(r"kubectl apply -f cluster/kuberay/(\S+\.yaml)")
# Kinds of object a step can refer to by name: what a missing one leaves undone.
KINDS = ("PersistentVolumeClaim", "Service", "Secret")
# Names used in commands beside the steps: `service/NAME`, `kubectl get secret NAME`.
COMMAND_REFERENCES = {"Service": re.compile(r"\bservice/([a-z0-9-]+)"),
                      "Secret": re.compile(r"kubectl get secret ([a-z0-9-]+)")}
# A Service named in a URL (http://mlflow:5000): a bare name, resolved in the namespace.
SERVICE_URL = re.compile(r"https?://([a-z0-9-]+)(?::\d+)?(?:/|\b)")
# What the KubeRay operator makes for a RayCluster named NAME (the objects the docs use).
OPERATOR_MADE = {"Service": "{name}-head-svc", "Secret": "{name}"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def walk(node: Any) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair below ``node``, keys of lists' items None."""
    items = node.items() if isinstance(node, dict) else (
        (None, item) for item in node) if isinstance(node, list) else ()
    for key, value in items:
        yield key, value
        yield from walk(value)


def references(docs: list[dict[str, Any]], text: str = "") -> set[tuple[str, str]]:
    """(kind, name) of every claim, service and secret the documents (and commands in
    ``text``) name."""
    found = set()
    for doc in docs:
        for key, value in walk(doc):
            if key == "claimName":
                found.add(("PersistentVolumeClaim", value))
            elif key in ("secretName",) or (key == "secretKeyRef" and "name" in value):
                found.add(("Secret", value if key == "secretName" else value["name"]))
            elif key == "secretRef" and isinstance(value, dict):
                found.add(("Secret", value["name"]))
            elif isinstance(value, str):
                found |= {("Service", name) for name in SERVICE_URL.findall(value)
                          if "." not in name and name not in ("localhost",)}
    for kind, pattern in COMMAND_REFERENCES.items():
        found |= {(kind, name) for name in pattern.findall(text)}
    return found


def definitions(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(kind, name) of what applying the documents creates, the operator's objects too."""
    made = set()
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] in KINDS:
            made.add((doc["kind"], name))
        if doc["kind"] == "RayCluster":
            made.add(("Service", OPERATOR_MADE["Service"].format(name=name)))
            if (doc["spec"].get("authOptions") or {}).get("mode") == "token":
                made.add(("Secret", OPERATOR_MADE["Secret"].format(name=name)))
    return made


def header(path: Path) -> str:
    """A manifest's leading comment block, where its steps are."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def step_sequences() -> list[tuple[str, str]]:
    """(where, text) of every documented sequence of applies: manifest headers and README
    code blocks that apply a manifest."""
    found = [(path.name, header(path)) for path in MANIFESTS]
    found += [(f"README.md block {number}", block)
              for number, block in enumerate(readme_blocks(), 1)]
    return [(where, text) for where, text in found if APPLY.search(text)]


SEQUENCES = step_sequences()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_manifest_parses_and_names_its_objects(path):
    docs = documents(path)
    assert docs and all(doc.get("kind") and doc.get("metadata", {}).get("name") for doc in docs)


def test_the_steps_that_matter_are_found():
    # A manifest whose header lost its steps, or a README that stopped listing them, fails
    # here rather than passing for want of anything to check.
    where = {name for name, _ in SEQUENCES}
    assert {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "shared-volume.yaml"} <= where
    applied_last = [APPLY.findall(text)[-1] for where, text in SEQUENCES
                    if where.startswith("README")]
    assert {"raycluster.yaml", "rayjob.yaml"} <= set(applied_last)


@pytest.mark.parametrize("where, text", SEQUENCES, ids=[where for where, _ in SEQUENCES])
def test_each_documented_sequence_defines_what_it_uses(where, text):
    applied = APPLY.findall(text)
    assert all((KUBERAY / name).is_file() for name in applied), applied
    docs = [doc for name in applied for doc in documents(KUBERAY / name)]
    missing = references(docs, text) - definitions(docs)
    assert missing == set(), f"{where} applies {applied} but uses {sorted(missing)}"


def test_a_manifest_using_the_shared_claim_lists_the_file_that_defines_it_in_its_steps():
    # The bug this guards: rayjob.yaml mounted cadis-shared, defined only by raycluster.yaml.
    for path in MANIFESTS:
        used = {name for kind, name in references(documents(path))
                if kind == "PersistentVolumeClaim"}
        if used - {name for kind, name in definitions(documents(path))}:
            assert "shared-volume.yaml" in APPLY.findall(header(path)), path.name


@pytest.mark.parametrize("path", [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"],
                         ids=lambda path: path.name)
def test_token_auth_states_kuberay_1_5_1(path):
    # authOptions first exists in KubeRay 1.5.1; 1.5.0 drops it and runs without auth.
    assert any(key == "authOptions" and value == {"mode": "token"}
               for doc in documents(path) for key, value in walk(doc))
    assert ">= 1.5.1" in header(path)
    readme = README.read_text()
    assert ">= 1.5.1" in readme and "jsonpath='{.spec.authOptions}'" in readme


def test_no_manifest_defines_the_shared_claim_but_its_own_file():
    owners = [path.name for path in MANIFESTS
              if ("PersistentVolumeClaim", "cadis-shared") in definitions(documents(path))]
    assert owners == ["shared-volume.yaml"]


def test_the_check_finds_a_missing_claim():
    # The rule can fail: rayjob.yaml applied alone uses a claim nothing defines.
    docs = documents(KUBERAY / "rayjob.yaml")
    assert ("PersistentVolumeClaim", "cadis-shared") in references(docs) - definitions(docs)

"""Reading the deployment files as data: the Kubernetes manifests in k8s/, their objects and the environment a
container gets from them, and the settings' environment variable names as the code derives them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

import hub
from hub.settings import HubSettings
from producer.settings import ProducerSettings, ProviderKeys

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"

Obj = dict[str, Any]


def load_yaml(path: Path) -> list[Obj]:
    docs: list[Obj] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is not None:
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            docs.append(doc)
    return docs


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


@cache
def objects() -> tuple[tuple[str, Obj], ...]:
    """Every object of every manifest file, with the file's name."""
    return tuple((path.name, doc) for path in manifest_files() for doc in load_yaml(path))


def find(kind: str, name: str) -> Obj:
    matches = [o for _, o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in k8s/, found {len(matches)}"
    return matches[0]


def of_kind(kind: str) -> list[Obj]:
    return [o for _, o in objects() if o["kind"] == kind]


def kustomization() -> Obj:
    (doc,) = load_yaml(KUSTOMIZATION)
    return doc


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj, name: str) -> Obj:
    found: list[Obj] = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no single container {name!r}"
    return found[0]


def workloads() -> Iterator[Obj]:
    for _, o in objects():
        if o["kind"] in ("Deployment", "StatefulSet"):
            yield o


def container_port(c: Obj, port: str | int) -> int:
    """A probe's or Service's port, by name or number, as the container's port number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in c.get("ports", [])], f"{c['name']} declares no port {port}"
        return port
    (number,) = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert isinstance(number, int)
    return number


def _data(kind: str, name: str) -> dict[str, str]:
    obj = find(kind, name)
    data: dict[str, str] = dict(obj.get("data") or {})
    if kind == "Secret":
        # The template holds plain text; stringData wins over data, as in the API server.
        data.update(obj.get("stringData") or {})
    return data


def container_env(c: Obj, secret_values: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Kubernetes gives container `c` from the ConfigMap and Secret in k8s/: envFrom first, then
    env (which wins). `secret_values` replaces keys of the Secret template, as an operator fills it in."""

    def lookup(kind: str, ref: Obj) -> str | None:
        data = _data(kind, ref["name"])
        if kind == "Secret" and secret_values:
            data.update(secret_values)
        if ref["key"] not in data:
            assert ref.get("optional"), f"{kind} {ref['name']} has no key {ref['key']!r}"
            return None
        return data[ref["key"]]

    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = _data("ConfigMap", source["configMapRef"]["name"])
        else:
            data = _data("Secret", source["secretRef"]["name"]) | dict(secret_values or {})
        env.update({prefix + key: value for key, value in data.items()})
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        value = (
            lookup("ConfigMap", source["configMapKeyRef"])
            if "configMapKeyRef" in source
            else lookup("Secret", source["secretKeyRef"])
        )
        if value is not None:
            env[var["name"]] = value
    return env


def setting_env_names(cls: type[HubSettings] | type[ProducerSettings], prefix: str) -> dict[str, str]:
    """Setting field name → its environment variable, derived from the flag the way `settings_from_args` does."""
    return {f.name: prefix + f.metadata["flag"].upper().replace("-", "_") for f in dataclasses.fields(cls)}


HUB_ENV = setting_env_names(HubSettings, "HUB_")
PRODUCER_ENV = setting_env_names(ProducerSettings, "PRODUCER_")
PROVIDER_ENV = {f.name.upper() for f in dataclasses.fields(ProviderKeys)}


def default(cls: type[HubSettings] | type[ProducerSettings], name: str) -> Any:
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return f.default


def project_version() -> str:
    """The project's version: hub.__version__, which pyproject.toml takes too."""
    return hub.__version__

"""The manifests in k8s/ are valid Kubernetes objects (the API's own schemas, offline), the Prometheus Operator's
objects have the shape its CRDs require, and kustomization.yaml lists exactly the files there are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from .manifests import K8S, Obj, kustomization, load_yaml, manifest_files, objects, of_kind, project_version

# The oldest minor version the manifests are meant for (docs/deployment.md), and the newest the validator ships.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
# Kinds from CRDs, absent from the Kubernetes schemas; checked by shape below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor")}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    docs = load_yaml(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
            continue
        try:
            # strict: unknown fields are errors too, so a misspelt field cannot be silently ignored.
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            location = "/".join(str(p) for p in e.path)
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {location}: {e.message}")


def test_every_object_is_named_labelled_and_leaves_the_namespace_to_kustomize() -> None:
    seen: set[tuple[str, str]] = set()
    for file, obj in objects():
        meta = obj["metadata"]
        key = (obj["kind"], meta["name"])
        assert key not in seen, f"{file}: a second {key}"
        seen.add(key)
        assert len(meta["name"]) <= 63, f"{file}: name too long for a label value"
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "sse-hub", f"{file}: {key} lacks part-of"
        assert "namespace" not in meta, f"{file}: kustomization.yaml sets the namespace"


def _require(obj: Any, path: str, kind: type | tuple[type, ...]) -> Any:
    value = obj
    for part in path.split("."):
        assert isinstance(value, dict) and part in value, f"missing {path}"
        value = value[part]
    assert isinstance(value, kind), f"{path}: expected {kind}, got {type(value).__name__}"
    return value


# The fields of the monitoring.coreos.com/v1 CRDs these manifests use, and the types the CRDs give them.
_ENDPOINT_FIELDS = {"port": str, "path": str, "interval": str, "scrapeTimeout": str, "scheme": str}


def _check_endpoints(endpoints: list[Obj]) -> None:
    assert endpoints, "no endpoints"
    for endpoint in endpoints:
        unknown = set(endpoint) - set(_ENDPOINT_FIELDS)
        assert not unknown, f"fields this check does not know (add them with their CRD types): {unknown}"
        for name, kind in _ENDPOINT_FIELDS.items():
            if name in endpoint:
                assert isinstance(endpoint[name], kind), name
        assert endpoint["path"].startswith("/")
        for duration in ("interval", "scrapeTimeout"):
            if duration in endpoint:
                assert endpoint[duration][-1] in "smh" and endpoint[duration][:-1].isdigit(), duration


@pytest.mark.parametrize(
    ("kind", "endpoints_field"), [("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")]
)
def test_prometheus_operator_objects_have_the_crd_shape(kind: str, endpoints_field: str) -> None:
    monitors = of_kind(kind)
    assert monitors, f"no {kind} in k8s/"
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
        assert set(monitor["spec"]) <= {"selector", endpoints_field, "namespaceSelector", "jobLabel"}
        labels = _require(monitor, "spec.selector.matchLabels", dict)
        assert labels and all(isinstance(v, str) for v in labels.values())
        _check_endpoints(_require(monitor, f"spec.{endpoints_field}", list))


def test_kustomization_lists_every_manifest_and_only_files_that_exist() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    resources = k["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists {resource}, which does not exist"
    listed = {(K8S / r).resolve() for r in resources}
    unlisted = [p.name for p in manifest_files() if p.resolve() not in listed]
    assert not unlisted, f"manifests kustomization.yaml does not apply: {unlisted}"


def test_kustomization_generators_use_every_other_file() -> None:
    generated: set[Path] = set()
    for generator in kustomization().get("configMapGenerator", []):
        for entry in generator.get("files", []):
            source = entry.rpartition("=")[2]
            assert (K8S / source).is_file(), f"configMapGenerator {generator['name']}: {source} does not exist"
            generated.add((K8S / source).resolve())
    others = {p.resolve() for p in K8S.iterdir() if p.suffix != ".yaml"}
    assert others == generated, f"files in k8s/ that nothing uses: {sorted(p.name for p in others - generated)}"


def test_the_image_kustomize_sets_is_the_one_the_workloads_run_at_the_projects_version() -> None:
    (image,) = kustomization()["images"]
    assert image["newTag"] == project_version()
    for _, obj in objects():
        if (
            obj["kind"] in ("Deployment", "StatefulSet")
            and obj["metadata"]["labels"]["app.kubernetes.io/name"] == "sse-hub"
        ):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                assert c["image"] == f"{image['name']}:{project_version()}", f"{obj['metadata']['name']}/{c['name']}"


def test_the_namespace_kustomize_sets_is_created() -> None:
    (namespace,) = of_kind("Namespace")
    assert kustomization()["namespace"] == namespace["metadata"]["name"]

"""k8s/grafana-dashboard.json queries the metrics the hub and the workers export, by their real names and labels, and
shows every one of them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from hub.metrics import HubMetrics
from producer.metrics import ProducerMetrics

from .manifests import K8S

DASHBOARD = K8S / "grafana-dashboard.json"
# Labels Prometheus adds to every scraped series (Kubernetes service discovery and the Operator's monitors).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "container", "endpoint"}
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _exported() -> dict[str, tuple[str, set[str]]]:
    """Every series name the code exports → (its metric family, the family's labels)."""
    series: dict[str, tuple[str, set[str]]] = {}
    for metrics in (HubMetrics(CollectorRegistry()), ProducerMetrics(CollectorRegistry())):
        for collector in vars(metrics).values():
            if not isinstance(collector, MetricWrapperBase):
                continue
            (family,) = collector.describe()
            labels = set(collector._labelnames)
            for suffix in _SUFFIXES[family.type]:
                series[family.name + suffix] = (family.name, labels | ({"le"} if suffix == "_bucket" else set()))
    return series


EXPORTED = _exported()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, PromQL, legend) of every query on the dashboard, the template variables' included."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("legendFormat", "")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["definition"], ""


_NAME = re.compile(r"\b((?:hub|producer)_[a-z0-9_]+)\b")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\([^,]+,\s*([a-zA-Z_][a-zA-Z0-9_]*)\)")


def test_every_query_names_series_the_code_exports(dashboard: dict[str, Any]) -> None:
    for where, expr, legend in _queries(dashboard):
        names = _NAME.findall(expr)
        assert names, f"{where}: no hub or producer metric in {expr!r}"
        for name in names:
            assert name in EXPORTED, f"{where}: {name} is not a series the hub or the workers export"
        known = set.union(*(EXPORTED[n][1] for n in names)) | TARGET_LABELS
        used = set(_MATCHER.findall(" ".join(re.findall(r"\{([^}]*)\}", expr))))
        grouped = {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}
        used |= grouped | set(_LABEL_VALUES.findall(expr))
        assert used <= known, f"{where}: labels {sorted(used - known)} are not on {names}"
        # A legend can only show labels that survive the aggregation.
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert shown <= grouped, f"{where}: legend shows {sorted(shown - grouped)}, which the query aggregates away"


def test_every_metric_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    shown = {
        EXPORTED[name][0] for _, expr, _ in _queries(dashboard) for name in _NAME.findall(expr) if name in EXPORTED
    }
    families = {family for family, _ in EXPORTED.values()}
    assert families == shown, f"metrics missing from k8s/grafana-dashboard.json: {sorted(families - shown)}"


def test_the_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            # The data source is the dashboard's variable, so the dashboard works with any Prometheus.
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]

"""The manifests agree with the code: probe and metrics paths are routes the processes serve, ports are the ports they
listen on, every environment variable is a setting they read, the settings they get are valid and consistent, and
the HPA scales on a metric the hub exports. Renaming any of these in the code fails a test here."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from hub.__main__ import create_node
from hub.appkeys import PROVIDERS
from hub.metrics import HubMetrics
from hub.settings import HubSettings
from producer.__main__ import _serve_endpoints
from producer.settings import ProducerSettings, ProviderKeys, providers_for
from ssecore.liveness import Liveness
from tests.conftest import ClientFactory

from .manifests import (
    HUB_ENV,
    PRODUCER_ENV,
    PROVIDER_ENV,
    Obj,
    container,
    container_env,
    container_port,
    find,
    of_kind,
    pod_spec,
    workloads,
)

# What an operator puts into the Secret template; the template itself has no credentials.
FILLED_IN = {"jwt-secret": "s" * 32, "api-keys": "svc k" + "k" * 20 + " gen:*"}

HUB = find("Deployment", "sse-hub")
PRODUCER = find("Deployment", "sse-hub-producer")
HUB_CONTAINER = container(HUB, "hub")
PRODUCER_CONTAINER = container(PRODUCER, "producer")


def hub_settings(secret_values: dict[str, str] | None = None) -> HubSettings:
    return HubSettings.from_args(
        [], container_env(HUB_CONTAINER, FILLED_IN if secret_values is None else secret_values)
    )


def producer_settings() -> ProducerSettings:
    return ProducerSettings.from_args([], container_env(PRODUCER_CONTAINER, FILLED_IN))


@pytest.fixture
async def hub(make_client: ClientFactory) -> TestClient[Any, Any]:
    return await make_client(embedded_worker="off")


@pytest.fixture
async def producer_metrics() -> AsyncIterator[str]:
    """The worker's own metrics server (what `python -m producer` starts), on a free port: its base URL."""
    settings = ProducerSettings(metrics_host="127.0.0.1", metrics_port=0)
    runner = await _serve_endpoints(settings, CollectorRegistry(), Liveness())
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


# -- environment ------------------------------------------------------------------------------------------------------


def test_every_configured_variable_is_one_the_processes_read() -> None:
    known = set(HUB_ENV.values()) | set(PRODUCER_ENV.values()) | PROVIDER_ENV
    (config,) = of_kind("ConfigMap")
    unknown = set(config["data"]) - known
    assert not unknown, f"ConfigMap keys no process reads (misspelt, or a renamed setting?): {sorted(unknown)}"
    for workload, c, own in ((HUB, HUB_CONTAINER, HUB_ENV), (PRODUCER, PRODUCER_CONTAINER, PRODUCER_ENV)):
        names = {var["name"] for var in c.get("env", [])}
        unknown = names - set(own.values()) - PROVIDER_ENV
        assert not unknown, f"{workload['metadata']['name']}: env vars it does not read: {sorted(unknown)}"


def test_the_template_as_it_is_stops_the_hub_instead_of_running_it_open() -> None:
    with pytest.raises(ValueError, match="no credentials"):
        hub_settings(secret_values={})
    assert not hub_settings().anonymous


def test_hub_and_workers_get_valid_settings_and_share_the_store() -> None:
    hub, producer = hub_settings(), producer_settings()
    assert hub.redis_url is not None and hub.redis_url == producer.redis_url
    # Workers that disagree on these write where the hub does not read, or trim what it still serves.
    assert (hub.key_prefix, hub.history, hub.ttl_s) == (producer.key_prefix, producer.history, producer.ttl_s)
    assert hub.embedded_worker == "off", "the workers are their own Deployment"


def test_production_runs_no_demo_provider() -> None:
    # The demo streams canned text at no cost: in production it would only hold worker slots for whoever asks.
    assert "demo" not in create_node(hub_settings())[PROVIDERS].kinds, "the hub must refuse provider: demo"
    assert "demo" not in providers_for(producer_settings(), ProviderKeys()), "the workers must not run demo jobs"


def test_the_redis_url_points_at_the_redis_service() -> None:
    url = hub_settings().redis_url
    assert url is not None
    (service,) = [s for s in of_kind("Service") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]
    port = service["spec"]["ports"][0]["port"]
    assert url.startswith(f"redis://{service['metadata']['name']}:{port}/")


def test_no_injected_service_variable_can_shadow_a_setting() -> None:
    # Kubernetes sets <SERVICE>_PORT=tcp://... (and more) for every Service in the namespace unless told not to;
    # a Service named "hub" would set HUB_PORT, which the hub reads as its --port.
    for workload in workloads():
        assert pod_spec(workload)["enableServiceLinks"] is False, workload["metadata"]["name"]
    settings_env = set(HUB_ENV.values()) | set(PRODUCER_ENV.values())
    for service in of_kind("Service"):
        base = service["metadata"]["name"].upper().replace("-", "_")
        injected = {f"{base}_SERVICE_HOST", f"{base}_SERVICE_PORT", f"{base}_PORT"}
        assert not injected & settings_env, service["metadata"]["name"]


# -- ports and paths --------------------------------------------------------------------------------------------------


def test_the_hub_listens_where_the_manifests_send_traffic() -> None:
    port = hub_settings().port
    assert container_port(HUB_CONTAINER, "http") == port
    annotations = HUB["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    service = find("Service", "sse-hub")
    assert service["spec"]["selector"].items() <= HUB["spec"]["template"]["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert container_port(HUB_CONTAINER, service_port["targetPort"]) == port


def test_the_worker_serves_metrics_where_the_manifests_scrape() -> None:
    port = producer_settings().metrics_port
    assert port != 0
    assert container_port(PRODUCER_CONTAINER, "metrics") == port
    assert PRODUCER["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_the_producer_runs_the_worker_module() -> None:
    assert PRODUCER_CONTAINER["args"] == ["python", "-m", "producer"]
    assert "command" not in PRODUCER_CONTAINER and "command" not in HUB_CONTAINER
    assert "args" not in HUB_CONTAINER, "the image's default command runs the hub"


async def test_hub_probes_hit_routes_that_answer(hub: TestClient[Any, Any]) -> None:
    readiness, liveness = HUB_CONTAINER["readinessProbe"]["httpGet"], HUB_CONTAINER["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/readyz", "/healthz"), "readiness must check the backend"
    for probe in (readiness, liveness):
        assert container_port(HUB_CONTAINER, probe["port"]) == hub_settings().port
        response = await hub.get(probe["path"])
        assert response.status == 200, probe["path"]


async def test_the_hub_metrics_path_serves_the_metrics(hub: TestClient[Any, Any]) -> None:
    paths = {HUB["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]}
    paths |= {e["path"] for e in find("ServiceMonitor", "sse-hub")["spec"]["endpoints"]}
    (path,) = paths
    response = await hub.get(path)
    assert response.status == 200
    assert "hub_connections_open" in await response.text()


async def test_producer_probe_and_metrics_paths_are_served(producer_metrics: str) -> None:
    readiness = PRODUCER_CONTAINER["readinessProbe"]["httpGet"]
    liveness = PRODUCER_CONTAINER["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/readyz", "/healthz"), "readiness must check Redis"
    for probe in (readiness, liveness):
        assert container_port(PRODUCER_CONTAINER, probe["port"]) == producer_settings().metrics_port
    paths = {readiness["path"], liveness["path"]}
    paths.add(PRODUCER["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    paths |= {e["path"] for e in find("PodMonitor", "sse-hub-producer")["spec"]["podMetricsEndpoints"]}
    async with aiohttp.ClientSession() as session:
        for path in paths:
            async with session.get(producer_metrics + path) as response:
                assert response.status == 200, path


def test_monitors_select_the_workloads_by_their_port_names() -> None:
    service = find("Service", "sse-hub")
    monitor = find("ServiceMonitor", "sse-hub")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    pod_monitor = find("PodMonitor", "sse-hub-producer")
    assert (
        pod_monitor["spec"]["selector"]["matchLabels"].items()
        <= PRODUCER["spec"]["template"]["metadata"]["labels"].items()
    )
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        container_port(PRODUCER_CONTAINER, endpoint["port"])


# -- shutdown ---------------------------------------------------------------------------------------------------------


def _prestop_pause_s(c: Obj) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return float(command[1])


def test_hub_pods_get_time_for_the_pause_and_the_whole_drain() -> None:
    # Endpoint removal races the SIGTERM: the pause keeps the node serving until the ingress stops sending streams
    # here, then the drain needs its whole grace period; past terminationGracePeriodSeconds the kubelet kills it.
    pause = _prestop_pause_s(HUB_CONTAINER)
    assert pause > 0
    assert pod_spec(HUB)["terminationGracePeriodSeconds"] > pause + hub_settings().grace_s


def test_workers_get_time_to_finish_or_hand_back_their_generations() -> None:
    assert pod_spec(PRODUCER)["terminationGracePeriodSeconds"] > producer_settings().grace_s + 5


# -- scaling and disruption -------------------------------------------------------------------------------------------


def test_the_hpa_scales_the_hub_on_its_open_streams_gauge_with_cpu_as_fallback() -> None:
    hpa = find("HorizontalPodAutoscaler", "sse-hub")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", HUB["metadata"]["name"])
    assert "replicas" not in HUB["spec"], "the HPA owns the replica count; applying again must not reset it"
    (gauge,) = HubMetrics(CollectorRegistry()).connections_open.describe()
    assert gauge.type == "gauge"
    pods, cpu = hpa["spec"]["metrics"]
    assert pods["type"] == "Pods" and pods["pods"]["metric"]["name"] == gauge.name
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    # With two pods at the target, either can take the other's streams without reaching --max-streams.
    assert hpa["spec"]["minReplicas"] >= 2
    assert int(pods["pods"]["target"]["averageValue"]) * 2 <= hub_settings().max_streams


def test_the_disruption_budget_covers_the_hub_pods() -> None:
    pdb = find("PodDisruptionBudget", "sse-hub")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= HUB["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] == 1


# -- ingress ----------------------------------------------------------------------------------------------------------


def _nginx_size_bytes(value: str) -> int:
    found = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert found, value
    return int(found[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[found[2].lower()]


def test_the_ingress_streams_unbuffered_and_keeps_idle_streams_open() -> None:
    ingress = find("Ingress", "sse-hub")
    annotations = ingress["metadata"]["annotations"]
    nginx = "nginx.ingress.kubernetes.io/"
    assert annotations[nginx + "proxy-buffering"] == "off"
    assert annotations[nginx + "proxy-http-version"] == "1.1"
    settings = hub_settings()
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        # A keep-alive comment goes out every heartbeat; a timeout shorter than that would cut idle streams.
        assert int(annotations[nginx + timeout]) > 4 * settings.heartbeat_s, timeout
    assert _nginx_size_bytes(annotations[nginx + "proxy-body-size"]) >= settings.max_body_bytes


def test_the_ingress_routes_the_api_only_to_the_hub_service() -> None:
    ingress = find("Ingress", "sse-hub")
    service = find("Service", "sse-hub")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            # /metrics, /healthz and /readyz are open endpoints: they stay inside the cluster.
            assert path["path"] == "/v1" and path["pathType"] == "Prefix"
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


# -- security ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", list(workloads()), ids=lambda w: w["metadata"]["name"])
def test_every_container_runs_unprivileged_on_a_read_only_root(workload: Obj) -> None:
    pod = pod_spec(workload)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False, "nothing here talks to the Kubernetes API"
    for c in pod["containers"]:
        context = c["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= set(c["resources"]), c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"]), c["name"]


def test_the_trial_redis_is_a_version_the_backend_supports() -> None:
    redis = find("StatefulSet", "sse-hub-redis")
    (c,) = pod_spec(redis)["containers"]
    found = re.fullmatch(r"redis:(\d+)\.(\d+)(?:[-.]\w+)*", c["image"])
    assert found and int(found[1]) >= 7, "the Redis backend needs Redis 7.0 or newer"
    assert redis["spec"]["replicas"] == 1

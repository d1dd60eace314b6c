"""The monitoring deployment hangs together: dashboard queries, Prometheus targets, compose and k8s wiring.

These check the files against each other (what Grafana queries, what Prometheus scrapes, which
ports and health paths compose and Kubernetes use), and run the compose healthcheck command
against a real HTTP server. They need Python only; the tools themselves validate the files in
.ci/run (`docker-compose config -q`, `kubectl kustomize deploy`).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboard import dashboard_exprs, dashboard_metrics, promql_metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrec.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
WORKER_PORT, TRAINER_PORT = 9108, 9109

# What the dashboard must show (issue 13): throughput, lag, freshness, blocks, DLQ, errors,
# snapshots and the CTR model.
REQUIRED_METRICS = {
    "streamrec_events_processed_total",
    "streamrec_events_consumed_total",
    "streamrec_consumer_lag",
    "streamrec_freshness_seconds",
    "streamrec_block_events",
    "streamrec_block_seconds",
    "streamrec_dead_letters_total",
    "streamrec_redis_errors_total",
    "streamrec_kafka_errors_total",
    "streamrec_snapshot_age_seconds",
    "streamrec_trainer_auc",
    "streamrec_trainer_logloss",
    "streamrec_ctr_model_version",
    "streamrec_trainer_model_version",
    "streamrec_trainer_samples_total",
    "streamrec_trainer_gate_decisions_total",
}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


# --- dashboard ---------------------------------------------------------------------------------


def test_dashboard_metrics_reads_every_panel_and_variable(tmp_path: Path) -> None:
    dash = {
        "panels": [
            {
                "type": "timeseries",
                "targets": [
                    {"refId": "A", "expr": 'sum by (reason) (rate(x_dead_letters_total{reason!="oversize"}[5m]))'},
                    {
                        "refId": "B",
                        "expr": "histogram_quantile(0.5, sum(rate(x_lat_seconds_bucket[$__rate_interval])) by (le))",
                    },
                ],
            },
            {
                "type": "row",
                "collapsed": True,
                "panels": [
                    {
                        "type": "stat",
                        "targets": [{"refId": "A", "expr": "x_lat_seconds_sum / ignoring(stage) x_lat_seconds_count"}],
                    },
                    {"type": "text"},
                ],
            },
        ],
        "templating": {
            "list": [
                {"type": "query", "name": "p", "query": {"query": 'label_values(x_lag{stage=~"$stage"}, partition)'}},
                {"type": "datasource", "name": "ds", "query": "prometheus"},
            ]
        },
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dash))
    assert dashboard_metrics(path) == {"x_dead_letters_total", "x_lat_seconds", "x_lag"}


def test_dashboard_queries_only_streamrec_metrics_and_covers_the_issue() -> None:
    metrics = dashboard_metrics(DASHBOARD)
    assert all(m.startswith("streamrec_") for m in metrics), sorted(
        m for m in metrics if not m.startswith("streamrec_")
    )
    assert metrics >= REQUIRED_METRICS, sorted(REQUIRED_METRICS - metrics)
    # every expression names at least one metric (a typo'd function call would name none)
    assert all(promql_metrics(e) for e in dashboard_exprs(DASHBOARD))


def test_dashboard_is_provisionable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "streamrec" and "id" not in dash  # a provisioned file must not pin a database id
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dash["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]


# --- Grafana provisioning and Prometheus -------------------------------------------------------


def _compose_config() -> dict[str, Any]:
    # the file as written (docker-compose itself validates it in .ci/run: `docker-compose config -q`)
    config: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return config


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose_config()


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), from docker-compose 1.x short or v2 long volume syntax."""
    mounts = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            mounts[target] = (_resolved(source), "ro" in (mode[0].split(",") if mode else []))
        else:
            mounts[v["target"]] = (_resolved(v.get("source", "")), bool(v.get("read_only")))
    return mounts


def _resolved(source: str) -> str:
    """A bind mount's host path as docker-compose resolves it (relative to the compose file)."""
    return str((ROOT / source).resolve()) if source.startswith(".") else source


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "streamrec.yml").read_text())["providers"]

    grafana = compose["services"]["grafana"]
    assert _pinned(grafana["image"]) and grafana["image"].startswith("grafana/grafana:")
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == (str(PROVISIONING), True)
    assert mounts[provider["options"]["path"]] == (str(DASHBOARD.parent), True)
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_prometheus_scrapes_every_compose_process(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert _pinned(prometheus["image"]) and prometheus["image"].startswith("prom/prometheus:")
    assert _mounts(prometheus)["/etc/prometheus/prometheus.yml"] == (str(PROMETHEUS), True)

    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    expected = set()
    for name, service in compose["services"].items():
        if service.get("image") != "streamrec:local":
            continue
        port = service["environment"]["STREAMREC_METRICS_PORT"]
        role = service["command"][0]
        assert int(port) == (TRAINER_PORT if role == "trainer" else WORKER_PORT), name
        assert [str(p) for p in service["expose"]] == [port], name
        expected.add(f"{name}:{port}")
    assert {"worker-1:9108", "item-stage-1:9108", "trainer:9109"} <= expected
    assert targets == expected


# --- compose healthchecks, run for real ---------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        code = self.status.get(self.path, 404)
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok" if code == 200 else b"not ready")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, dict[str, int]]]:
    status: dict[str, int] = {}
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("service", "path"), [("worker-1", "/readyz"), ("item-stage-1", "/readyz"), ("trainer", "/healthz")]
)
def test_compose_healthcheck_follows_the_endpoint(
    compose: dict[str, Any], health_server: tuple[int, dict[str, int]], service: str, path: str
) -> None:
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"] and path in test[-1]
    port, status = health_server
    env = {**os.environ, "STREAMREC_METRICS_PORT": str(port)}
    cmd = [sys.executable, *test[2:]]  # the image's python; here the test's
    status[path] = 200
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode == 0
    status[path] = 503
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode != 0


# --- Kubernetes --------------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    k: dict[str, Any] = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return k


def _resources() -> list[dict[str, Any]]:
    return [d for f in _kustomization()["resources"] for d in yaml.safe_load_all((DEPLOY / f).read_text()) if d]


def _of(kind: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kustomization()["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}


def test_deployments_probe_the_metrics_port() -> None:
    deployments = _of("Deployment", _resources())
    assert {d["metadata"]["name"] for d in deployments} == {
        "streamrec-worker",
        "streamrec-item-stage",
        "streamrec-trainer",
    }
    for d in deployments:
        (container,) = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
        expected = TRAINER_PORT if container["args"] == ["trainer"] else WORKER_PORT
        assert port["containerPort"] == expected and env["STREAMREC_METRICS_PORT"] == str(expected), d["metadata"]
        for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, (d["metadata"]["name"], probe)


def test_service_monitor_reaches_every_deployment() -> None:
    docs = _resources()
    (monitor,) = _of("ServiceMonitor", docs)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    monitored = [
        s for s in _of("Service", docs) if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    for d in _of("Deployment", docs):
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        (container,) = d["spec"]["template"]["spec"]["containers"]
        (container_port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
        services = [s for s in monitored if _selects(s["spec"]["selector"], pod_labels)]
        assert len(services) == 1, (d["metadata"]["name"], [s["metadata"]["name"] for s in services])
        (port,) = services[0]["spec"]["ports"]
        assert port["name"] == endpoint["port"] and port["targetPort"] == "metrics"
        assert port["port"] == container_port

"""The deployment assets agree with the server: ports, health path, metric names, config."""

from __future__ import annotations

import json
import re

import yaml

from qatune.config import load_config
from qatune.serve.app import ROUTES
from qatune.serve.metrics import METRIC_NAMES, ServiceMetrics
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
PORT = 8000


def k8s(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / name).read_text(encoding="utf-8"))


def test_dockerfile_serves_the_config_on_the_exposed_port():
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^EXPOSE {PORT}$", text, re.M)
    assert "torch==2.13.0" in text and f"127.0.0.1:{PORT}/health" in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:3] == ["qatune", "serve", "/etc/qatune/serve.yaml"] and cmd[cmd.index("--port") + 1] == str(PORT)
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / copied).exists(), copied
    config = load_config(DEPLOY / "serve.yaml")
    assert config.serve.port == PORT and config.serve.host == "0.0.0.0"


def test_kubernetes_manifests_match_the_server():
    deployment, service, hpa = k8s("deployment.yaml"), k8s("service.yaml"), k8s("hpa.yaml")
    configmap = k8s("configmap.yaml")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == PORT
    args = container["args"]
    assert args[args.index("--port") + 1] == str(PORT)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": PORT}
    assert "/health" in ROUTES
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(PORT) and annotations["prometheus.io/path"] == "/metrics"
    assert service["spec"]["ports"][0]["targetPort"] == PORT
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # the ConfigMap is the file the container reads, and it is a valid qatune config
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert f"{mount['mountPath']}/serve.yaml" == args[2]
    assert configmap["metadata"]["name"] == pod["spec"]["volumes"][0]["configMap"]["name"]
    served = yaml.safe_load(configmap["data"]["serve.yaml"])
    assert load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flat(served).items()]).serve.port == PORT


def test_prometheus_scrapes_the_metrics_route():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and "/metrics" in ROUTES
    assert all(t.endswith(f":{PORT}") for t in job["static_configs"][0]["targets"])


def test_grafana_dashboard_uses_the_served_metric_names():
    dashboard = json.loads((DEPLOY / "grafana" / "qatune-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bqatune_[a-z_]+", " ".join(exprs)))
    metrics = ServiceMetrics()
    metrics.requests.labels("/answer", "200").inc()  # labelled metrics have samples once a label is used
    metrics.latency.labels("/answer").observe(0.1)
    exported = {s.name for m in metrics.registry.collect() for s in m.samples}
    assert used <= exported, used - exported
    assert set(METRIC_NAMES.values()) <= exported | {n.removesuffix("_bucket") for n in exported}
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    assert "latency" in titles and "error rate" in titles
    assert any("status=~\"5..\"" in e for e in exprs)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_readme_documents_the_deploy_commands():
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "docker build -f deploy/Dockerfile" in text and "kubectl apply -f deploy/k8s/" in text


def test_nginx_proxy_limits_match_the_server():
    text = (DEPLOY / "nginx.conf").read_text(encoding="utf-8")
    config = load_config(DEPLOY / "serve.yaml").serve

    def setting(name: str) -> str:
        return re.search(rf"^\s*{name}\s+([^;]+);", text, re.M).group(1).strip()

    assert int(setting("client_max_body_size").rstrip("m")) * 2**20 <= config.max_body_bytes
    for name in ("client_body_timeout", "client_header_timeout"):
        assert int(setting(name).rstrip("s")) <= config.read_timeout
    assert int(setting("keepalive_timeout").rstrip("s")) <= config.timeout_keep_alive
    assert int(setting("proxy_read_timeout").rstrip("s")) > config.request_timeout  # qatune's own 504 comes first
    assert setting("proxy_buffering") == "off"  # server-sent events stream
    assert f"127.0.0.1:{PORT}" in setting("server")
    assert "nginx.conf" in (DEPLOY / "README.md").read_text(encoding="utf-8")

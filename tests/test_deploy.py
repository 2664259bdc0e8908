"""deploy/ checked by the tools that will read it: HAProxy's and nginx's own configuration checks, systemd's
unit verifier, warmpool's config loader for the configuration the Kubernetes manifests carry, and
kustomize for the manifests themselves. A missing tool skips its test (outside CI, where it fails);
test_multihost.py runs the HAProxy configuration for real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from warmpool.config import config_from_mapping

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
K8S = DEPLOY / "kubernetes"


def tool(name: str, package: str) -> str:
    """The program's path; without it the test is skipped, except under CI, where it fails."""
    found = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if found:
        return found
    reason = f"{name} is missing (Debian: apt-get install {package}; `make system-deps` installs it)"
    if os.environ.get("CI"):
        pytest.fail(reason + ", and CI is set: this test must run under CI")
    pytest.skip(reason)


def haproxy_check(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("haproxy", "haproxy"), "-c", "-f", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cfg.parent)


def shipped_haproxy_env(tmp_path: Path) -> dict[str, str]:
    return {"WARMPOOL_HAPROXY_SOCKET": str(tmp_path / "admin.sock"),
            "WARMPOOL_MODELS_MAP": str(DEPLOY / "haproxy" / "warmpool-models.map")}


# -- HAProxy ----------------------------------------------------------------------------------------------

def test_haproxy_config_is_valid_and_clean(tmp_path: Path) -> None:
    result = haproxy_check(HAPROXY_CFG, shipped_haproxy_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout + result.stderr


def test_haproxy_check_catches_a_broken_copy(tmp_path: Path) -> None:
    """The check above can fail: the same file with the balancing algorithm misspelt is rejected."""
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(HAPROXY_CFG.read_text().replace("hash-type consistent", "hash-type consistant"))
    assert haproxy_check(broken, shipped_haproxy_env(tmp_path)).returncode != 0


def test_haproxy_routes_by_model_with_bounded_load_agent_health_and_retries() -> None:
    backend = "\n".join(routing_lines(section(HAPROXY_CFG.read_text(), "backend warmpool_hosts")))
    for line in ("balance hash var(txn.wp_model)", "hash-type consistent", "hash-balance-factor 150",
                 "option httpchk GET /readyz", "option redispatch 1", "retry-on conn-failure empty-response 503",
                 "option http-buffer-request", "option http-no-delay"):
        assert line in backend
    assert re.search(r"default-server .*\bcheck\b.*\bagent-check\b.*\bagent-port\b", backend)
    assert "req.hdr(X-Warmpool-Phase)" in backend and "json_query('$.model')" in backend


def test_the_kubernetes_haproxy_routes_like_the_shipped_one(tmp_path: Path) -> None:
    """One routing policy: the ConfigMap's backend is the shipped one but for how servers are found."""
    config = configmap(K8S / "haproxy.yaml", "haproxy-config")
    shipped, k8s = (routing_lines(section(text, "backend warmpool_hosts"))
                    for text in (HAPROXY_CFG.read_text(), config["haproxy.cfg"]))
    assert k8s == shipped
    for name, text in config.items():  # the map path as mounted -> this temporary copy
        (tmp_path / name).write_text(text.replace("/usr/local/etc/haproxy", str(tmp_path)))
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr


def section(text: str, header: str) -> str:
    """The lines of one HAProxy section, from its header to the next unindented line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end])


def routing_lines(backend: str) -> list[str]:
    """A backend's directives, without comments, servers, values from the environment or file paths."""
    out = []
    for line in backend.splitlines()[1:]:
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("server ", "server-template ")):
            continue
        line = re.sub(r'"\$\{[A-Z0-9_]+-([^}"]*)\}"', r"\1", line)  # "${NAME-default}" -> default
        out.append(re.sub(r"map\([^)]*\)", "map(FILE)", line))
    return out


# -- nginx ------------------------------------------------------------------------------------------------

def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx", "nginx")
    (tmp_path / "logs").mkdir()
    main = tmp_path / "nginx.conf"
    main.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\nevents {{}}\n"
                    f"http {{ include {DEPLOY / 'nginx' / 'warmpool.conf'}; }}\n")
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "logs/error.log")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (DEPLOY / "nginx" / "warmpool.conf").read_text()
    assert "hash $warmpool_model consistent;" in text
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in text
    assert "proxy_buffering off;" in text


# -- systemd ----------------------------------------------------------------------------------------------

def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart pointed at this checkout's interpreter (the unit's own path
    exists only once installed); it prints a line for anything it had to ignore, so no output is a pass."""
    analyze = tool("systemd-analyze", "systemd")
    unit = (DEPLOY / "systemd" / "warmpool.service").read_text()
    assert "ExecStart=/opt/warmpool/bin/warmpool serve --config /etc/warmpool/config.yaml" in unit
    local = tmp_path / "warmpool.service"
    local.write_text(unit.replace("ExecStart=/opt/warmpool/bin/warmpool", f"ExecStart={sys.executable} -m warmpool"))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, cwd=tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    broken = tmp_path / "broken.service"
    broken.write_text(local.read_text().replace("KillMode=mixed", "KillMode=gently"))
    assert "kill mode" in subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True,
                                        cwd=tmp_path).stderr


# -- Kubernetes -------------------------------------------------------------------------------------------

def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def configmap(path: Path, name: str) -> dict[str, str]:
    return next(doc["data"] for doc in yaml.safe_load_all(path.read_text())
                if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name)


def test_kubernetes_daemonset_runs_on_gpu_nodes_with_the_model_store_and_readiness() -> None:
    daemonset = next(d for d in manifests() if d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    warmpool = next(c for c in spec["containers"] if c["name"] == "warmpool")
    assert warmpool["readinessProbe"]["httpGet"]["path"] == "/readyz"
    store = next(v for v in spec["volumes"] if v["name"] == "models")
    assert "hostPath" in store
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in warmpool["volumeMounts"]
    assert "memory" not in warmpool["resources"].get("limits", {})  # see the manifest: it would evict the RAM tier


def test_kubernetes_services_and_the_config_they_carry_load() -> None:
    docs = manifests()
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    assert services["warmpool-hosts"]["clusterIP"] == "None"  # headless: HAProxy finds every pod
    assert services["warmpool"]["selector"] == {"app.kubernetes.io/name": "warmpool-haproxy"}
    raw = yaml.safe_load(configmap(K8S / "warmpool.yaml", "warmpool-config")["config.yaml"])
    cfg = config_from_mapping(raw, env={}, source="<configmap>")
    assert (cfg.listen_host, cfg.balancer.agent_port, cfg.balancer.agent_host) == ("0.0.0.0", 9100, "0.0.0.0")
    ports = {p["containerPort"] for d in docs if d["kind"] == "DaemonSet"
             for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert {cfg.listen_port, cfg.balancer.agent_port} <= ports


def test_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # not a Debian package: skipped under CI too (the checks above still read the YAML)
        pytest.skip("kubectl is missing (https://kubernetes.io/docs/tasks/tools/)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == sorted(["Namespace", "ConfigMap", "ConfigMap", "DaemonSet", "Deployment", "Service", "Service"])

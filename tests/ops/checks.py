#!/usr/bin/env python3
"""Operations checks for Belfry: Helm chart, Kubernetes manifests, compose file, Prometheus config,
Dockerfile, dashboard and docs. Run through tests/ops/check.sh, which prepares the tools.

Each check prints one PASS/FAIL/SKIP line (plus details on failure); the last line is
`ops: N passed, M failed` (with `, K skipped` when something was skipped).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import urllib.request
from pathlib import Path

import yaml

import helm_python as helm
import kubernetes_validate
from kubernetes_validate import utils as kv

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "belfry"
OPS = REPO / "tests" / "ops"
RELEASE = "belfry"
NAMESPACE = "belfry"

# Kubernetes versions validated against: the chart's minimum (Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows.
KUBE_MIN = "1.25"
KUBE_LATEST = kv.latest_version()
# Custom resources kubernetes-validate has no schema for. They are skipped (and reported as skipped) by
# the schema check; their shape is checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

def _doc_table(path: Path, heading: str) -> dict[str, str]:
    """First-column `names` of the markdown table under `heading`, with the second column."""
    rows: dict[str, str] = {}
    inside = False
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            inside = line.strip() == heading
            continue
        m = re.match(r"^\| `([a-z_]+)` \| `?([^|`]*)`? \|", line)
        if inside and m:
            rows[m.group(1)] = m.group(2).strip()
    return rows


# The metrics docs/operations.md documents, by type: the dashboard may use only these.
CONTRACT_METRICS = _doc_table(REPO / "docs" / "operations.md", "## Metrics")
# What the dashboard must show (brief: connections, channels, messages in/out, HTTP by status, publish p99,
# bus lag, slow consumers, rate limits, redis reconnects, coordinator leader).
DASHBOARD_REQUIRED = [
    "belfry_connections", "belfry_channels", "belfry_messages_in_total", "belfry_messages_out_total",
    "belfry_http_requests_total", "belfry_http_publish_seconds_bucket", "belfry_bus_lag_seconds_bucket",
    "belfry_slow_consumer_disconnects_total", "belfry_rate_limited_total", "belfry_redis_reconnects_total",
    "belfry_coordinator_leader",
]
# belfry.toml keys docs/configuration.md documents (a Rust test keeps that page in step with the code).
TOML_TOP_KEYS = set(_doc_table(REPO / "docs" / "configuration.md", "## Node settings (top level of the file)"))
TOML_APP_KEYS = set(_doc_table(REPO / "docs" / "configuration.md", "## App settings (`[[apps]]`)"))
assert "belfry_connections" in CONTRACT_METRICS and "apps" in TOML_TOP_KEYS and "secret" in TOML_APP_KEYS, \
    "could not read the metric and configuration tables from docs/"

RESULTS = {"passed": 0, "failed": 0, "skipped": 0}


class Skip(Exception):
    """Raised by a check that cannot run here; counted as skipped, not failed."""


def run(name: str, fn, *args, **kwargs):
    """Run one check, print its outcome, count it. A check returns a short string saying what it saw."""
    try:
        detail = fn(*args, **kwargs)
    except Skip as e:
        RESULTS["skipped"] += 1
        print(f"SKIP {name}: {e}", flush=True)
        return None
    except AssertionError as e:
        RESULTS["failed"] += 1
        print(f"FAIL {name}: {e}", flush=True)
        return None
    except Exception as e:  # noqa: BLE001 - any error is a loud failure
        RESULTS["failed"] += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=3, file=sys.stdout)
        return None
    RESULTS["passed"] += 1
    print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)
    return detail


def load_values(name: str | None) -> dict:
    if name is None:
        return {}
    return yaml.safe_load((OPS / name).read_text()) or {}


# ---------------------------------------------------------------- helm lint


def check_lint(values_file: str | None) -> str:
    values = load_values(values_file)
    report = helm.lint(str(CHART), values or None, strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_LATEST}.0")
    msgs = report.get("messages") or []
    problems = [m for m in msgs if int(m.get("severity", 0)) >= 2]
    errors = report.get("errors") or []
    assert report.get("total_charts_linted") == 1, f"linted {report.get('total_charts_linted')} charts"
    assert not problems and not errors, "lint findings:\n  " + "\n  ".join(
        [f"[sev {m['severity']}] {m['path']}: {m['error']}" for m in problems] + [str(e) for e in errors])
    infos = [m["error"] for m in msgs if int(m.get("severity", 0)) < 2]
    return f"helm lint --strict clean ({len(infos)} info: {'; '.join(infos) or 'none'})"


# ---------------------------------------------------------------- render


def render(values: dict | None, name: str = RELEASE) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or None, name=name, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__source__", path)
                docs.append(doc)
    return docs


def notes(values: dict | None) -> str:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or None, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def clean(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__source__"}


def check_render(values_file: str | None, store: dict) -> str:
    docs = render(load_values(values_file))
    assert docs, "rendered nothing"
    kinds = {}
    for d in docs:
        assert "apiVersion" in d and "kind" in d and d.get("metadata", {}).get("name"), \
            f"{d['__source__']}: manifest without apiVersion/kind/metadata.name"
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    names = [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs]
    assert len(names) == len(set(names)), f"duplicate resources: {names}"
    store[values_file] = docs
    n = notes(load_values(values_file))
    assert "REVERB_HOST" in n and "4200" in n, "NOTES.txt lacks the Laravel lines or the drain note"
    return f"{len(docs)} manifests: " + ", ".join(f"{k}x{v}" for k, v in sorted(kinds.items()))


def check_validate(docs: list[dict], version: str) -> str:
    errors, skipped, ok = [], [], 0
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            skipped.append(d["kind"])
            continue
        try:
            kv.validate(clean(d), version, strict=True)
            ok += 1
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{d['__source__']} {d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"{d['__source__']}: {e.message}")
    assert not errors, "schema errors:\n  " + "\n  ".join(errors)
    extra = f"; skipped CRD {', '.join(sorted(set(skipped)))} (no schema in kubernetes-validate)" if skipped else ""
    return f"{ok} manifests valid (strict) against Kubernetes {version}{extra}"


# ---------------------------------------------------------------- semantics of the rendered chart


def by_kind(docs, kind, component=None):
    out = [d for d in docs if d["kind"] == kind]
    if component:
        out = [d for d in out if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    return out


def one(docs, kind, component=None):
    found = by_kind(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_semantics(docs: list[dict], values: dict) -> str:
    merged = helm_merged(values)
    seen = []
    dep = one(docs, "Deployment", "node")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": merged["node"]["port"], "metrics": merged["node"]["metricsPort"]}, f"ports {ports}"
    # Probes on the metrics port.
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, c["livenessProbe"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, c["readinessProbe"]
    # Drain timing: grace > preStop + shutdown_grace_secs.
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "/bin/sleep", cmd
    pre = int(cmd[1])
    grace = merged["config"]["shutdownGraceSecs"]
    tgp = spec["terminationGracePeriodSeconds"]
    assert tgp > pre + grace, f"terminationGracePeriodSeconds {tgp} <= preStop {pre} + shutdown grace {grace}"
    seen.append(f"grace {tgp}s > {pre}s preStop + {grace}s drain")
    # Config file mounted and passed.
    assert "--config=/etc/belfry/belfry.toml" in c["args"], c["args"]
    assert "--host=0.0.0.0" in c["args"], c["args"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/belfry")
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert vol["secret"]["items"][0]["path"] == "belfry.toml"
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["BELFRY_REDIS_URL"]["valueFrom"], "Redis URL must come from a Secret"
    prefix = merged["redis"].get("prefix") or "belfry"
    assert env["BELFRY_REDIS_PREFIX"]["value"] == prefix, f"node redis prefix {env['BELFRY_REDIS_PREFIX']}"
    # The edge limits reach the node as BELFRY_* variables, whichever way the file is given.
    edge = merged["config"]["edge"]
    for var, key in [("BELFRY_MAX_CONNECTIONS_PER_IP", "maxConnectionsPerIp"),
                     ("BELFRY_CONNECTIONS_PER_IP_PER_MINUTE", "connectionsPerIpPerMinute"),
                     ("BELFRY_HEADER_TIMEOUT_SECS", "headerTimeoutSecs"),
                     ("BELFRY_BODY_TIMEOUT_SECS", "bodyTimeoutSecs"),
                     ("BELFRY_FD_RESERVE", "fdReserve")]:
        assert env[var]["value"] == str(edge[key]), f"{var}: {env[var]} != {edge[key]}"
    if edge["trustedProxies"]:
        assert env["BELFRY_TRUSTED_PROXIES"]["value"] == ",".join(edge["trustedProxies"])
    else:
        assert "BELFRY_TRUSTED_PROXIES" not in env
    assert ("BELFRY_API_REQUESTS_PER_SECOND" in env) == (edge.get("apiRequestsPerSecond") is not None)
    seen.append(f"edge limits {edge['maxConnectionsPerIp']}/ip, {edge['connectionsPerIpPerMinute']}/ip/min")
    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
    cfg_secret, cfg_key = vol["secret"]["secretName"], vol["secret"]["items"][0]["key"]
    redis_ref = env["BELFRY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    if merged["config"]["existingSecret"]:
        assert cfg_secret == merged["config"]["existingSecret"] and cfg_key == merged["config"]["existingSecretKey"]
        assert cfg_secret not in secrets, "existingSecret must not be created by the chart"
        seen.append(f"apps from existing secret {cfg_secret}/{cfg_key}")
    else:
        toml_text = secrets[cfg_secret]["stringData"][cfg_key]
        cfg = tomllib.loads(toml_text)
        unknown_top = set(cfg) - TOML_TOP_KEYS - set(merged["config"].get("extra") or {})
        assert not unknown_top, f"belfry.toml has keys outside the contract: {unknown_top}"
        assert cfg["shutdown_grace_secs"] == grace and cfg["metrics_port"] == merged["node"]["metricsPort"]
        assert cfg["max_connections"] == merged["config"]["maxConnections"]
        assert len(cfg["apps"]) == len(merged["config"]["apps"]), "apps lost in rendering"
        for want, got in zip(merged["config"]["apps"], cfg["apps"]):
            assert set(got) <= TOML_APP_KEYS, f"app keys outside the contract: {set(got) - TOML_APP_KEYS}"
            for k, v in want.items():
                assert got[k] == (str(v) if k in ("id", "key", "secret") else v), f"app {k}: {got[k]!r} != {v!r}"
        seen.append(f"belfry.toml parses, {len(cfg['apps'])} app(s), keys within the contract")
    if merged["redis"]["existingSecret"]:
        assert redis_ref == {"name": merged["redis"]["existingSecret"], "key": merged["redis"]["existingSecretKey"]}
    else:
        assert secrets[redis_ref["name"]]["stringData"][redis_ref["key"]] == merged["redis"]["url"]
    # rediss:// with a private CA: the CA Secret is mounted where BELFRY_REDIS_TLS_CA points, in every pod.
    ca_secret = merged["redis"]["tlsCaSecret"]
    ca_pods = [spec] + [d["spec"]["template"]["spec"] for d in by_kind(docs, "Deployment", "coordinator")]
    for pod_spec in ca_pods:
        ctr = pod_spec["containers"][0]
        ctr_env = {e["name"]: e for e in ctr.get("env", [])}
        ca_vols = [v for v in pod_spec.get("volumes", []) if v.get("secret", {}).get("secretName") == ca_secret]
        if ca_secret:
            assert len(ca_vols) == 1, f"{ctr['name']}: no volume from {ca_secret}"
            assert ca_vols[0]["secret"]["items"][0]["key"] == merged["redis"]["tlsCaSecretKey"]
            ca_mount = [m for m in ctr.get("volumeMounts", []) if m["name"] == ca_vols[0]["name"]][0]
            ca_path = ctr_env["BELFRY_REDIS_TLS_CA"]["value"]
            assert ca_path == f"{ca_mount['mountPath']}/{ca_vols[0]['secret']['items'][0]['path']}", ca_path
        else:
            assert "BELFRY_REDIS_TLS_CA" not in ctr_env and not ca_vols
    if ca_secret:
        seen.append(f"redis CA from {ca_secret} in {len(ca_pods)} pod spec(s)")
    tls_secret = merged["node"]["tlsSecret"]
    tls_vols = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == tls_secret]
    if tls_secret:
        assert len(tls_vols) == 1, f"no volume from {tls_secret}"
        tls_mount = [m for m in c["volumeMounts"] if m["name"] == tls_vols[0]["name"]][0]["mountPath"]
        assert env["BELFRY_TLS_CERT"]["value"] == f"{tls_mount}/tls.crt", env["BELFRY_TLS_CERT"]
        assert env["BELFRY_TLS_KEY"]["value"] == f"{tls_mount}/tls.key", env["BELFRY_TLS_KEY"]
        seen.append(f"node TLS from {tls_secret}")
    else:
        assert "BELFRY_TLS_CERT" not in env and "BELFRY_TLS_KEY" not in env and not tls_vols
    # Security: non-root, read-only root.
    assert spec["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    # Replicas vs HPA.
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if merged["autoscaling"]["enabled"]:
        assert "replicas" not in dep["spec"], "replicas must be left to the HPA"
        hpa = hpas[0]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        res = sorted(m["resource"]["name"] for m in hpa["spec"]["metrics"])
        want = ["cpu"] + (["memory"] if merged["autoscaling"]["targetMemoryUtilizationPercentage"] else [])
        assert res == want, f"HPA metrics {res} != {want}"
        seen.append(f"HPA on {'+'.join(res)}")
    else:
        assert not hpas and dep["spec"]["replicas"] == merged["node"]["replicaCount"]
        seen.append(f"{dep['spec']['replicas']} replicas, no HPA")
    # Services select the right pods.
    node_labels = pod["metadata"]["labels"]
    svc = one(docs, "Service", "node")
    assert matches(svc["spec"]["selector"], node_labels), "node Service does not select node pods"
    assert {p["name"] for p in svc["spec"]["ports"]} == {"http", "metrics"}
    for pdb in by_kind(docs, "PodDisruptionBudget", "node"):
        assert matches(pdb["spec"]["selector"]["matchLabels"], node_labels)
    co = by_kind(docs, "Deployment", "coordinator")
    if merged["coordinator"]["enabled"]:
        co = co[0]
        co_labels = co["spec"]["template"]["metadata"]["labels"]
        assert co["spec"]["replicas"] == merged["coordinator"]["replicaCount"]
        assert not matches(svc["spec"]["selector"], co_labels), "node Service must not select coordinators"
        cc = co["spec"]["template"]["spec"]["containers"][0]
        assert cc["command"] == ["belfry-coordinator"], cc["command"]
        assert any(a.startswith("--redis-url=") for a in cc["args"])
        cenv = {e["name"]: e for e in cc["env"]}
        assert cenv["BELFRY_REDIS_PREFIX"]["value"] == (merged["redis"].get("prefix") or "belfry"), \
            "the coordinator must use the nodes' Redis prefix"
        seen.append(f"coordinator x{co['spec']['replicas']}")
    # Ingress routes to the node Service's http port.
    for ing in by_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                b = p["backend"]["service"]
                assert b["name"] == svc["metadata"]["name"] and b["port"] == {"name": "http"}, b
        ann = ing["metadata"].get("annotations", {})
        assert ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout"), "WebSocket timeouts missing"
        seen.append("ingress -> service http")
    # ServiceMonitor shape (its schema is not checked by kubernetes-validate).
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        services = [s for s in by_kind(docs, "Service") if matches(sm["spec"]["selector"]["matchLabels"],
                                                                   s["metadata"]["labels"])]
        assert len(services) == (2 if merged["coordinator"]["enabled"] else 1), \
            f"ServiceMonitor selects {[s['metadata']['name'] for s in services]}"
        for s in services:
            assert "metrics" in {p["name"] for p in s["spec"]["ports"]}
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
        seen.append(f"ServiceMonitor scrapes {len(services)} services")
    for cm in by_kind(docs, "ConfigMap"):
        if cm["metadata"]["name"].endswith("-dashboard"):
            assert cm["metadata"]["labels"].get(merged["dashboard"]["labelKey"]) == merged["dashboard"]["labelValue"]
            json.loads(cm["data"]["belfry.json"])
            seen.append("dashboard ConfigMap labelled")
    return "; ".join(seen)


def helm_merged(values: dict) -> dict:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.merge_values(values or None)


def check_render_fails(values: dict, needle: str) -> str:
    try:
        render(values)
    except helm.HelmError as e:
        assert needle in str(e), f"failed, but not with {needle!r}: {e}"
        return f"refused: {needle}"
    raise AssertionError(f"rendering {values} should fail with {needle!r}")


def check_validator_is_strict() -> str:
    """The schema check must catch a typo: a misspelt field in a pod spec is an error, not ignored."""
    docs = render({"node": {"podSecurityContext": {"runAsNonRoot": True, "runAsUsr": 10001}}})
    try:
        check_validate(docs, KUBE_LATEST)
    except AssertionError as e:
        assert "runAsUsr" in str(e), f"failed for another reason: {e}"
        return "an unknown field (runAsUsr) is rejected"
    raise AssertionError("kubernetes-validate accepted an unknown field: strict mode is not in effect")


def check_release_names() -> str:
    out = []
    for name in ("belfry", "prod", "a-very-long-release-name-that-is-close-to-the-limit-x"):
        docs = render({"dashboard": {"enabled": True}, "serviceMonitor": {"enabled": True},
                       "ingress": {"enabled": True}, "autoscaling": {"enabled": True}}, name=name)
        for d in docs:
            n = d["metadata"]["name"]
            assert len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n), f"bad name {n!r}"
        out.append(f"{name[:12]}->{one(docs, 'Deployment', 'node')['metadata']['name']}")
    return ", ".join(out)


# ---------------------------------------------------------------- values documentation


def check_values_documented() -> str:
    """Every key in values.yaml has a comment right above it (or inline), unless it sits inside a value
    documented as a whole with a '# --' comment (e.g. podSecurityContext)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)(- )?([A-Za-z0-9_.\-/\"]+):(\s.*)?$")
    covered_stack: list[int] = []  # indents of keys documented as a whole
    missing, count = [], 0
    prev_comment, prev_whole = False, False
    for i, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s:
            prev_comment = False
            continue
        if s.startswith("#"):
            if s.startswith("# --") or s.startswith("- # --"):
                prev_whole = True
            elif not prev_comment:
                prev_whole = False
            prev_comment = True
            continue
        m = key_re.match(raw)
        if raw.lstrip().startswith("- # --"):
            prev_comment, prev_whole = True, True
            continue
        if not m:
            prev_comment = False
            continue
        indent = len(m.group(1)) + (2 if m.group(2) else 0)
        while covered_stack and covered_stack[-1] >= indent:
            covered_stack.pop()
        count += 1
        inline = "#" in (m.group(4) or "")
        documented = prev_comment or inline or bool(covered_stack)
        if not documented:
            missing.append(f"line {i}: {s}")
        value = (m.group(4) or "").split("#")[0].strip()
        if (prev_whole and prev_comment) and not value:
            covered_stack.append(indent)
        prev_comment, prev_whole = False, False
    assert not missing, "values.yaml keys without a comment:\n  " + "\n  ".join(missing)
    return f"{count} keys, each documented"


# ---------------------------------------------------------------- dashboard and docs


def check_dashboard() -> str:
    d = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = []
    def walk(p):
        for t in p.get("targets", []):
            exprs.append(t["expr"])
        for sub in p.get("panels", []):
            walk(sub)
    for p in d["panels"]:
        walk(p)
    used = set()
    for e in exprs:
        for m in re.findall(r"\bbelfry_[a-z_]+", e):
            used.add(m)
    base = {re.sub(r"_(bucket|sum|count)$", "", m) if re.sub(r"_(bucket|sum|count)$", "", m) in CONTRACT_METRICS
            else m for m in used}
    unknown = base - set(CONTRACT_METRICS)
    assert not unknown, f"dashboard uses metrics not in the contract: {unknown}"
    missing = [m for m in DASHBOARD_REQUIRED if m not in used]
    assert not missing, f"dashboard lacks {missing}"
    assert any("histogram_quantile(0.99" in e and "belfry_http_publish_seconds_bucket" in e for e in exprs)
    cells: dict = {}
    for p in d["panels"]:
        g = p["gridPos"]
        for gx in range(g["x"], g["x"] + g["w"]):
            for gy in range(g["y"], g["y"] + g["h"]):
                assert (gx, gy) not in cells, f"panels {cells[(gx, gy)]!r} and {p['title']!r} overlap"
                cells[(gx, gy)] = p["title"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    return f"{len(exprs)} queries over {len(base)} contract metrics, publish p99 via histogram_quantile"


def check_docs() -> str:
    ops = (REPO / "docs" / "operations.md").read_text()
    # Every metric the code registers is in the operations guide's table.
    in_code = set()
    for src in list((REPO / "node" / "src").rglob("*.rs")) + list((REPO / "coordinator" / "src").rglob("*.rs")):
        in_code |= set(re.findall(r'"(belfry_[a-z_]+)"', src.read_text()))
    missing = sorted(in_code - set(CONTRACT_METRICS))
    assert not missing, f"docs/operations.md's metric table does not document {missing}"
    stale = sorted(set(CONTRACT_METRICS) - in_code)
    assert not stale, f"docs/operations.md documents metrics the code does not register: {stale}"
    for needle in ("helm upgrade --install", "docker-compose", "/healthz", "/readyz", "4200", "4100",
                   "BELFRY_LOG_FORMAT=json", "RUST_LOG", "docs/benchmarks.md", "BROADCAST_CONNECTION=reverb",
                   "REVERB_SCHEME=http", "preStop"):
        assert needle in ops, f"docs/operations.md does not mention {needle!r}"
    assert not re.search(r"\bTODO\b|\bTBD\b|XXX", ops), "docs/operations.md has placeholders"
    readme = (CHART / "README.md").read_text()
    assert "bitnami" in readme and "existingSecret" in readme, "chart README lacks the redis/secret sections"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert not chart.get("dependencies"), "Chart.yaml must not declare dependencies (bring your own Redis)"
    return f"operations.md documents all {len(in_code)} metrics the code registers; chart README present; no chart dependencies"


# ---------------------------------------------------------------- compose, prometheus, Dockerfile


def compose_bin() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise AssertionError("docker-compose not installed (check.sh installs it with apt-get)")


def check_compose_quiet() -> str:
    env = dict(os.environ)
    r = subprocess.run(compose_bin() + ["-f", "docker-compose.yml", "config", "-q"], cwd=REPO,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}{r.stderr}"
    return "docker-compose -f docker-compose.yml config -q: exit 0" + (f" ({r.stderr.strip()})" if r.stderr.strip() else "")


def check_compose_shape() -> str:
    r = subprocess.run(compose_bin() + ["-f", "docker-compose.yml", "config"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    svcs = cfg["services"]
    for s in ("redis", "node1", "node2", "coordinator", "prometheus"):
        assert s in svcs, f"service {s} missing"
        assert "healthcheck" in svcs[s], f"service {s} has no healthcheck"
    def published(svc):
        out = set()
        for p in svcs[svc].get("ports", []):
            if isinstance(p, dict):
                out.add((int(p["published"]), int(p["target"])))
            else:
                parts = str(p).split(":")
                out.add((int(parts[-2]), int(parts[-1])))
        return out
    assert (8080, 8080) in published("node1"), published("node1")
    assert (8081, 8080) in published("node2"), published("node2")
    for n in ("node1", "node2"):
        cmd = " ".join(svcs[n]["command"]) if isinstance(svcs[n]["command"], list) else svcs[n]["command"]
        assert "--redis-url redis://redis:6379" in cmd and "0.0.0.0" in cmd, cmd
        env = svcs[n].get("environment", {})
        for k in ("REVERB_APP_ID", "REVERB_APP_KEY", "REVERB_APP_SECRET"):
            assert env.get(k), f"{n} lacks {k}"
    assert svcs["node1"]["environment"]["REVERB_APP_KEY"] == svcs["node2"]["environment"]["REVERB_APP_KEY"]
    # The coordinator delivers the webhooks: it needs the same app and the same webhook variables.
    cenv = svcs["coordinator"].get("environment", {})
    for k in ("REVERB_APP_ID", "REVERB_APP_KEY", "REVERB_APP_SECRET", "BELFRY_WEBHOOK_URL",
              "BELFRY_WEBHOOK_EVENT_TYPES", "BELFRY_WEBHOOK_GRACE_MS"):
        assert k in cenv and k in svcs["node1"]["environment"], f"coordinator or node1 lacks {k}"
        assert cenv[k] == svcs["node1"]["environment"][k], f"{k} differs between node1 and the coordinator"
    vols = " ".join(str(v) for v in svcs["prometheus"].get("volumes", []))
    assert "prometheus.yml" in vols, "prometheus.yml not mounted"
    return "redis, node1 (8080), node2 (8081), coordinator, prometheus; all with healthchecks; same app and webhooks on the nodes and the coordinator"


def check_prometheus() -> str:
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = set()
    for job in cfg["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job.get("static_configs", []):
            targets.update(sc["targets"])
    want = {"node1:9601", "node2:9601", "coordinator:9602"}
    assert want <= targets, f"prometheus.yml scrapes {targets}, needs {want}"
    return f"scrapes {', '.join(sorted(targets))}"


def check_dockerfile() -> str:
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(froms) >= 2, "Dockerfile must be multi-stage"
    final = text[text.rfind("\nFROM"):]
    assert re.search(r"^USER\s+(?!root|0\b)\S+", final, re.M), "runtime stage must switch to a non-root USER"
    expose = " ".join(re.findall(r"^EXPOSE\s+(.*)$", final, re.M))
    assert "8080" in expose and "9601" in expose, f"EXPOSE {expose}"
    assert re.search(r'^CMD\s+\["belfry-node"\]', final, re.M), "default CMD must be belfry-node"
    assert re.search(r"BELFRY_HOST=0\.0\.0\.0", final), "runtime must set BELFRY_HOST=0.0.0.0"
    for b in ("belfry-node", "belfry-coordinator"):
        assert re.search(rf"COPY --from=\S+ .*{b}", final), f"{b} not copied into the runtime image"
    ign = (REPO / ".dockerignore").read_text().split()
    assert "target" in ign or "target/" in ign or "/target" in ign, ".dockerignore must exclude target/"
    return f"stages: {', '.join(f[1] or f[0] for f in froms)}; non-root; EXPOSE {expose}; CMD belfry-node " \
           "(static checks only: no Docker engine here)"


# ---------------------------------------------------------------- the real binary reads the chart's config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_node_reads_config(docs: list[dict]) -> str:
    binary = Path(os.environ.get("BELFRY_NODE_BIN", REPO / "target" / "release" / "belfry-node"))
    if not binary.exists():
        raise Skip(f"{binary} not built")
    try:
        help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=10).stdout
    except Exception as e:  # noqa: BLE001
        raise Skip(f"{binary} --help failed: {e}")
    if "--config" not in help_text:
        raise Skip(f"{binary} does not take --config yet")
    secret = next(d for d in docs if d["kind"] == "Secret")
    toml_text = secret["stringData"]["belfry.toml"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "belfry.toml"
        cfg.write_text(toml_text)
        port, mport = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BELFRY_", "REVERB_"))}
        proc = subprocess.Popen([str(binary), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                                 "--metrics-port", str(mport)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 10
            status = {}
            while time.time() < deadline and proc.poll() is None:
                try:
                    for path in ("/healthz", "/readyz"):
                        with urllib.request.urlopen(f"http://127.0.0.1:{mport}{path}", timeout=1) as r:
                            status[path] = r.status
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/up", timeout=1) as r:
                        status["/up"] = r.status
                    break
                except OSError:
                    time.sleep(0.2)
            assert proc.poll() is None, f"belfry-node exited {proc.returncode} with the chart's belfry.toml: " \
                                        f"{proc.stderr.read()[-2000:]}"
            assert status == {"/healthz": 200, "/readyz": 200, "/up": 200}, f"health answers {status}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return f"{binary.name} started with the chart's belfry.toml; /healthz, /readyz, /up answered 200"


# ---------------------------------------------------------------- main


def main() -> int:
    print(f"ops: helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), "
          f"kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}"
          f" -> Kubernetes {KUBE_MIN} and {KUBE_LATEST}", flush=True)
    variants = [None, "values-full.yaml", "values-apps.yaml"]
    label = {None: "defaults", "values-full.yaml": "values-full.yaml", "values-apps.yaml": "values-apps.yaml"}
    for v in variants:
        run(f"helm lint ({label[v]})", check_lint, v)
    rendered: dict = {}
    for v in variants:
        run(f"helm template ({label[v]})", check_render, v, rendered)
    for v in variants:
        if v not in rendered:
            continue
        for version in (KUBE_MIN, KUBE_LATEST):
            run(f"kubernetes-validate {version} ({label[v]})", check_validate, rendered[v], version)
        run(f"chart semantics ({label[v]})", check_semantics, rendered[v], load_values(v))
    run("render refuses a too-short terminationGracePeriodSeconds", check_render_fails,
        {"node": {"terminationGracePeriodSeconds": 20}}, "must be larger than")
    run("render refuses metricsPort 0", check_render_fails, {"node": {"metricsPort": 0}}, "must not be 0")
    run("render refuses a missing Redis URL", check_render_fails, {"redis": {"url": ""}}, "redis.url")
    run("render refuses an app without a secret", check_render_fails,
        {"config": {"apps": [{"id": "a", "key": "k"}]}}, "config.apps[0].secret")
    run("kubernetes-validate rejects unknown fields", check_validator_is_strict)
    run("resource names for several release names", check_release_names)
    run("values.yaml documented field by field", check_values_documented)
    run("grafana dashboard", check_dashboard)
    run("docs", check_docs)
    run("docker-compose config -q", check_compose_quiet)
    run("docker-compose services", check_compose_shape)
    run("deploy/prometheus.yml", check_prometheus)
    run("Dockerfile", check_dockerfile)
    if None in rendered:
        run("belfry-node accepts the chart's belfry.toml", check_node_reads_config, rendered[None])
    line = f"ops: {RESULTS['passed']} passed, {RESULTS['failed']} failed"
    if RESULTS["skipped"]:
        line += f", {RESULTS['skipped']} skipped"
    print(line, flush=True)
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

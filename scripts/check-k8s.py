"""What a schema cannot check in the rendered Kubernetes manifests and the Grafana dashboard.

Run by scripts/check-k8s (in its virtual environment, which has PyYAML), after kustomize has
rendered each kustomization under deploy/k8s into one file and kubernetes-validate has
checked those files against the Kubernetes schemas:

    python check-k8s.py [--quiver BIN] --dashboard deploy/grafana/quiver-dashboard.json \
        RENDERED.yaml...

The facts it checks against are read from the sources, not copied here: the configuration's
keys from config/src/raw.rs and config/src/upstream.rs, the default shutdown_grace_ms from
config/src/lib.rs, the waits after the grace from gateway/src/serve.rs, the metric names and
labels from gateway/src/metrics.rs.

Per rendered file:
  - it holds documents, among them the gateway DaemonSet, the worker Deployment, their
    Services (the workers' headless), the workers' HorizontalPodAutoscaler (autoscaling/v2,
    CPU) and PodDisruptionBudget, and the ConfigMaps the pods mount;
  - each ConfigMap's TOML parses (tomllib), uses only keys the config crate knows, spells
    devices, routing and upstream addresses as it wants, and, with --quiver, passes
    `quiver config check`;
  - terminationGracePeriodSeconds > preStop sleep + shutdown_grace_ms + the waits after it;
  - the listeners of the TOML are the containers' ports, the probes hit /v2/health/ready
    and /v2/health/live on the REST port, the Prometheus annotations name the metrics port;
  - each `[models.upstream] dns` is NAME.NAMESPACE.svc.CLUSTER_DOMAIN of a headless Service
    of the same render that selects the workers, on a port that reaches the worker's
    listener of that protocol, and the workers serve the model;
  - models on cuda:N  <=>  the gateway requests nvidia.com/gpu, tolerates its taint and runs
    the quiver:cuda image;
  - pods run as non-root with a read-only root filesystem.
The dashboard: valid JSON; every metric its queries name is one metrics.rs exports, with
the labels it has; every $variable is defined.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DOMAIN = os.environ.get("K8S_CLUSTER_DOMAIN", "cluster.local")

errors: list[str] = []


def fail(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def read(rel: str) -> str:
    return (ROOT / rel).read_text()


# ---- facts read from the sources -------------------------------------------------------


def raw_structs() -> dict[str, list[str]]:
    """Field names of the config crate's serde structs (`deny_unknown_fields`)."""
    text = read("config/src/raw.rs") + read("config/src/upstream.rs")
    structs = {}
    for name, body in re.findall(r"struct (Raw\w+) \{(.*?)\n\}", text, re.S):
        structs[name] = re.findall(r"^\s*(?:pub\(crate\) )?(\w+): Option<", body, re.M)
    for want in ("RawConfig", "RawServer", "RawTls", "RawModel", "RawDemo", "RawUpstream"):
        if not structs.get(want):
            sys.exit(f"check-k8s.py: no fields of {want} found in config/src: update this check")
    return structs


def default_shutdown_grace_ms() -> int:
    m = re.search(
        r"DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_millis\(([\d_]+)\)",
        read("config/src/lib.rs"),
    )
    if not m:
        sys.exit("check-k8s.py: DEFAULT_SHUTDOWN_GRACE not found in config/src/lib.rs")
    return int(m.group(1).replace("_", ""))


def shutdown_tail_s() -> int:
    """Seconds `Gateway::shutdown` may still wait after the grace (answers flushed, QUIC
    closed): the sum of its fixed timeouts."""
    text = read("gateway/src/serve.rs")
    m = re.search(r"pub async fn shutdown\(.*?\n    \}\n", text, re.S)
    waits = re.findall(r"Duration::from_secs\((\d+)\)", m.group(0)) if m else []
    if not waits:
        print("check-k8s.py: warning: no fixed waits found in Gateway::shutdown; assuming 3 s")
        return 3
    return sum(int(w) for w in waits)


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the gateway exports, with its label names."""
    text = read("gateway/src/metrics.rs")
    labels = {
        name: set(re.findall(r"pub (\w+):", body))
        for name, body in re.findall(r"pub struct (\w+Labels) \{(.*?)\}", text, re.S)
    }
    for name, body in re.findall(r"struct (\w+Labels) \{(.*?)\}", text, re.S):
        labels.setdefault(name, set(re.findall(r"(\w+):", body)))
    kinds = {
        var: (lab, kind)
        for var, lab, kind in re.findall(
            r"let (\w+)\s*=\s*Family::<(\w+),\s*(Counter|Gauge|Histogram)", text
        )
    }
    # Metrics without labels: `let x = Gauge::default();`.
    labels[""] = set()
    for var, kind in re.findall(r"let (\w+)\s*=\s*(Counter|Gauge)::default\(\)", text):
        kinds.setdefault(var, ("", kind))
    out: dict[str, set[str]] = {}
    for name, var in re.findall(
        r'registry\.register\(\s*"(\w+)",\s*"(?:[^"\\]|\\.)*",\s*(\w+)\.clone\(\)', text
    ):
        if var not in kinds:
            sys.exit(f"check-k8s.py: the type of metrics.rs's `{var}` is not found")
        lab, kind = kinds[var]
        base = f"quiver_{name}"
        if kind == "Counter":
            out[base + "_total"] = labels[lab]
        elif kind == "Gauge":
            out[base] = labels[lab]
        else:
            out[base + "_bucket"] = labels[lab] | {"le"}
            out[base + "_sum"] = labels[lab]
            out[base + "_count"] = labels[lab]
    for name in re.findall(r'LatencyFamily::new\(\s*"(\w+)"', text):
        base = f"quiver_{name}"
        out[base + "_bucket"] = {"model", "le"}
        out[base + "_sum"] = {"model"}
        out[base + "_count"] = {"model"}
        out[f"quiver_{name.removesuffix('_seconds')}_quantile_seconds"] = {"model", "quantile"}
    if len(out) < 20:
        sys.exit(f"check-k8s.py: only {len(out)} metrics read from metrics.rs: update this check")
    return out


# ---- the configuration -----------------------------------------------------------------

ENDPOINT = re.compile(r"^(grpc|http)://(\[[^\]]+\]|[^/:\[\] ]+):(\d+)/?$")
DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
ROUTING = {"local-first", "local-only", "upstream-only"}


def check_keys(where: str, table: dict, allowed: list[str]) -> None:
    for key in table:
        if key not in allowed:
            fail(where, f"unknown key `{key}` (the config crate knows: {', '.join(allowed)})")


def check_config(where: str, text: str, structs: dict[str, list[str]], quiver: str | None):
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(where, f"not TOML: {e}")
        return None
    check_keys(where, config, structs["RawConfig"])
    check_keys(f"{where} [server]", config.get("server", {}), structs["RawServer"])
    check_keys(f"{where} [tls]", config.get("tls", {}), structs["RawTls"])
    models = config.get("models", [])
    if not models:
        fail(where, "no [[models]]")
    for i, m in enumerate(models):
        at = f"{where} models[{i}]"
        check_keys(at, m, structs["RawModel"])
        check_keys(f"{at}.demo", m.get("demo", {}), structs["RawDemo"])
        up = m.get("upstream")
        if up is not None:
            check_keys(f"{at}.upstream", up, structs["RawUpstream"])
            for e in up.get("endpoints", []) + ([up["dns"]] if "dns" in up else []):
                if not ENDPOINT.match(e):
                    fail(f"{at}.upstream", f"`{e}` is not grpc://HOST:PORT or http://HOST:PORT")
        if not DEVICE.match(m.get("device", "cpu")):
            fail(f"{at}.device", f"must be cpu, cuda or cuda:N, got {m['device']!r}")
        if m.get("routing", "local-first") not in ROUTING:
            fail(f"{at}.routing", f"must be one of {sorted(ROUTING)}, got {m['routing']!r}")
    if quiver:
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(text)
            f.flush()
            r = subprocess.run([quiver, "config", "check", f.name], capture_output=True, text=True)
            if r.returncode != 0:
                fail(where, f"`quiver config check` failed:\n{r.stdout}{r.stderr}")
    return config


def listen_port(config: dict, key: str, default: int | None) -> int | None:
    value = config.get("server", {}).get(key)
    if value is None:
        return default
    if value in ("off", ""):
        return None
    return int(value.rsplit(":", 1)[1])


# ---- the manifests ---------------------------------------------------------------------


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name: str, where: str) -> dict | None:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    if len(found) != 1:
        fail(where, f"expected one {kind} {name}, found {len(found)}")
        return None
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict, ref) -> dict | None:
    for p in container.get("ports", []):
        if ref in (p.get("name"), p.get("containerPort")):
            return p
    return None


def prestop_seconds(container: dict) -> int:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = " ".join(pre.get("exec", {}).get("command", []))
    m = re.search(r"\bsleep\s+(\d+)", command)
    return int(m.group(1)) if m else 0


def check_workload(where, docs, workload, role, structs, quiver, grace_default, tail):
    """The pod of a gateway or worker workload against the configuration it mounts.
    Returns (config, container)."""
    spec = workload["spec"]["template"]["spec"]
    meta = workload["spec"]["template"]["metadata"]
    containers = spec["containers"]
    if len(containers) != 1:
        fail(where, f"{role}: expected one container, found {len(containers)}")
        return None, None
    c = containers[0]
    argv = c.get("command", []) + c.get("args", [])
    if argv[:2] != ["quiver", "serve" if role == "gateway" else "worker"] or "--config" not in argv:
        fail(where, f"{role}: command must be `quiver {'serve' if role == 'gateway' else 'worker'} --config FILE`, got {argv}")
        return None, c
    path = argv[argv.index("--config") + 1]
    mount = next(
        (m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")),
        None,
    )
    volume = mount and next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), None)
    if not volume or "configMap" not in volume:
        fail(where, f"{role}: --config {path} is not on a ConfigMap volume")
        return None, c
    cm = one(docs, "ConfigMap", volume["configMap"]["name"], where)
    key = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    if cm is None or key not in cm.get("data", {}):
        fail(where, f"{role}: ConfigMap {volume['configMap']['name']} has no key {key}")
        return None, c
    config = check_config(f"{where} ConfigMap {cm['metadata']['name']}/{key}", cm["data"][key], structs, quiver)
    if config is None:
        return None, c

    # Draining: the kubelet's SIGKILL must not cut the drain short.
    grace_ms = config.get("server", {}).get("shutdown_grace_ms", grace_default)
    pre = prestop_seconds(c)
    need = pre + math.ceil(grace_ms / 1000) + tail
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    if pre <= 0:
        fail(where, f"{role}: no preStop sleep")
    if not tgps > need:
        fail(where, f"{role}: terminationGracePeriodSeconds {tgps} must exceed preStop {pre} s"
             f" + shutdown_grace_ms {grace_ms} + {tail} s after the grace = {need} s")
    else:
        print(f"  {where}: {role} grace {tgps} s > preStop {pre} s + shutdown_grace_ms {grace_ms}"
              f" + {tail} s = {need} s")

    # The listeners are the container's ports; probes and scraping use them.
    listeners = {
        "http": listen_port(config, "http_listen", 8000),
        "grpc": listen_port(config, "grpc_listen", 8001),
        "metrics": listen_port(config, "metrics_listen", 8002),
    }
    if role == "gateway":
        listeners["quic"] = listen_port(config, "quic_listen", 4433)
    for name, port in listeners.items():
        p = container_port(c, name)
        if port is None:
            continue
        if p is None or p["containerPort"] != port:
            fail(where, f"{role}: container port `{name}` must be {port} (the configuration's)")
        elif p.get("protocol", "TCP") != ("UDP" if name == "quic" else "TCP"):
            fail(where, f"{role}: port `{name}` has the wrong protocol")
    if role == "gateway":
        q = container_port(c, "quic")
        if not q or q.get("hostPort") != 4433:
            fail(where, "gateway: QUIC must be on hostPort 4433/UDP")
    for probe, want in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        get = c.get(probe, {}).get("httpGet", {})
        p = container_port(c, get.get("port"))
        if get.get("path") != want or not p or p["containerPort"] != listeners["http"]:
            fail(where, f"{role}: {probe} must GET {want} on the REST port {listeners['http']}")
    ann = meta.get("annotations", {})
    want_ann = {"prometheus.io/scrape": "true", "prometheus.io/port": str(listeners["metrics"]),
                "prometheus.io/path": "/metrics"}
    for k, v in want_ann.items():
        if ann.get(k) != v:
            fail(where, f"{role}: pod annotation {k} must be {v!r}, got {ann.get(k)!r}")

    # Non-root, read-only root filesystem.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
        fail(where, f"{role}: runAsNonRoot must be true")
    if not csc.get("readOnlyRootFilesystem"):
        fail(where, f"{role}: readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(where, f"{role}: allowPrivilegeEscalation must be false")
    return config, c


def check_render(path: Path, structs, quiver, grace_default, tail) -> None:
    where = path.name
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if not docs:
        fail(where, "rendered nothing")
        return
    print(f"  {where}: {len(docs)} objects: "
          + ", ".join(sorted({f"{d['kind']}" for d in docs})))
    gw = one(docs, "DaemonSet", "quiver-gateway", where)
    wk = one(docs, "Deployment", "quiver-worker", where)
    one(docs, "Service", "quiver-gateway", where)
    if gw is None or wk is None:
        return
    gconf, gc = check_workload(where, docs, gw, "gateway", structs, quiver, grace_default, tail)
    wconf, wc = check_workload(where, docs, wk, "worker", structs, quiver, grace_default, tail)
    worker_labels = wk["spec"]["template"]["metadata"]["labels"]

    if "replicas" in wk["spec"]:
        fail(where, "worker Deployment sets `replicas`: the HorizontalPodAutoscaler owns it")
    hpas = [h for h in by_kind(docs, "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "quiver-worker"}]
    if len(hpas) != 1 or hpas[0]["apiVersion"] != "autoscaling/v2" or not any(
        m.get("type") == "Resource" and m["resource"]["name"] == "cpu" for m in hpas[0]["spec"].get("metrics", [])
    ):
        fail(where, "expected one autoscaling/v2 HorizontalPodAutoscaler on CPU for Deployment quiver-worker")
    if not any(selects(p["spec"]["selector"].get("matchLabels", {}), worker_labels)
               for p in by_kind(docs, "PodDisruptionBudget")):
        fail(where, "no PodDisruptionBudget selects the workers")

    if gconf is None or wconf is None:
        return
    # Discovery: every dns name is a headless Service of this render that reaches the workers.
    worker_models = {m["name"] for m in wconf.get("models", [])}
    for m in gconf.get("models", []):
        up = m.get("upstream")
        if not up:
            continue
        if m.get("routing", "local-first") != "local-only" and (up.get("model") or m["name"]) not in worker_models:
            fail(where, f"gateway model {m['name']} overflows to workers that do not serve it")
        if "dns" not in up:
            continue
        scheme, host, port = ENDPOINT.match(up["dns"]).groups()
        svc = next((s for s in by_kind(docs, "Service")
                    if host == f"{s['metadata']['name']}.{s['metadata'].get('namespace', 'default')}.svc.{CLUSTER_DOMAIN}"),
                   None)
        at = f"{where} gateway model {m['name']} dns {up['dns']}"
        if svc is None:
            fail(at, f"names no Service of this render (NAME.NAMESPACE.svc.{CLUSTER_DOMAIN})")
            continue
        if svc["spec"].get("clusterIP") != "None":
            fail(at, "the Service must be headless (clusterIP: None): one address per worker")
        if not selects(svc["spec"].get("selector", {}), worker_labels):
            fail(at, "the Service does not select the worker pods")
        sp = next((p for p in svc["spec"].get("ports", []) if p["port"] == int(port)), None)
        target = sp and container_port(wc, sp.get("targetPort", sp["port"]))
        want = listen_port(wconf, "grpc_listen" if scheme == "grpc" else "http_listen", None)
        if not target or target["containerPort"] != want:
            fail(at, f"port {port} must reach the worker's {scheme} listener ({want})")
        if target and int(port) != target["containerPort"]:
            # The gateway dials the pod addresses DNS returns, not the Service's port.
            fail(at, f"port {port} is not the worker's container port {target['containerPort']}:"
                 " a headless Service's records point at the pods")

    # GPU: cuda models, the GPU request, the toleration and the CUDA image go together.
    ordinals = [0 if d == "cuda" else int(d.split(":")[1])
                for d in (m.get("device", "cpu") for m in gconf.get("models", [])) if d != "cpu"]
    gspec = gw["spec"]["template"]["spec"]
    gpus = int(gc.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    tolerates = any(t.get("key") == "nvidia.com/gpu" for t in gspec.get("tolerations", []))
    cuda_image = gc["image"].endswith(":cuda")
    if ordinals:
        if gpus < max(ordinals) + 1:
            fail(where, f"gateway models use cuda:{max(ordinals)} but the pod gets {gpus} nvidia.com/gpu")
        if not tolerates or not cuda_image:
            fail(where, "gateway on the GPU: needs the nvidia.com/gpu toleration and the quiver:cuda image")
    elif gpus or cuda_image:
        fail(where, "gateway models are all on the CPU: no nvidia.com/gpu and no quiver:cuda image")
    print(f"  {where}: gateway on {'cuda x' + str(gpus) if ordinals else 'cpu'}, image {gc['image']};"
          f" worker image {wc['image']}")


# ---- the dashboard ---------------------------------------------------------------------

GENERIC_LABELS = {"le", "instance", "job", "pod", "namespace", "quantile"}


def check_dashboard(path: Path) -> None:
    where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(where, f"not JSON: {e}")
        return
    before = len(errors)
    metrics = exported_metrics()
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    exprs = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                exprs.append((p.get("title", "?"), t.get("expr", "")))

    walk(dash.get("panels", []))
    if not exprs:
        fail(where, "no queries")
    names_used = set()
    for title, expr in exprs:
        at = f"{where} panel {title!r}"
        names = set(re.findall(r"\bquiver_\w+", expr))
        if not names:
            fail(at, f"query names no quiver_ metric: {expr}")
        unknown = names - metrics.keys()
        if unknown:
            fail(at, f"metrics not exported by gateway/src/metrics.rs: {sorted(unknown)}")
        names_used |= names
        known_labels = set().union(*(metrics.get(n, set()) for n in names)) | GENERIC_LABELS
        used = set(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", expr))
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            used |= {l.strip() for l in group.split(",") if l.strip()}
        if used - known_labels:
            fail(at, f"labels {sorted(used - known_labels)} are not labels of {sorted(names)}")
        for var in re.findall(r"\$(\w+)", expr):
            if not var.startswith("__") and var not in variables:
                fail(at, f"${var} is not a dashboard variable")
    if len(errors) == before:
        print(f"  {where}: {len(exprs)} queries over {len(names_used)} metrics, all exported by"
              " metrics.rs with the labels used")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quiver", help="a built quiver binary: run `quiver config check` on each ConfigMap")
    ap.add_argument("--dashboard", type=Path, required=True)
    ap.add_argument("rendered", nargs="+", type=Path)
    args = ap.parse_args()
    structs = raw_structs()
    grace_default, tail = default_shutdown_grace_ms(), shutdown_tail_s()
    for path in args.rendered:
        check_render(path, structs, args.quiver, grace_default, tail)
    check_dashboard(args.dashboard.resolve())
    if errors:
        print("\n".join(f"check-k8s: {e}" for e in errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Offline checks of deploy/k8s and deploy/compose.yaml:
#   - every base manifest against the Kubernetes schemas (kubernetes-validate
#     from PyPI ships them), strictly;
#   - cross-references: selectors, probe ports, HPA/PDB targets, the
#     ServiceMonitor's port, overlay patches, components and files;
#   - every component (deploy/k8s/components) the same way: its resources
#     against the schemas, its patches applied to the base Deployment and
#     the result validated, and the Redis it ships or points at wired to
#     the Sluice pods (Service, NetworkPolicy, SLUICE_REDIS_URL);
#   - the ConfigMap's sluice.toml and the compose config through
#     `sluice check-config`: refused for their placeholder tenant keys (exit 1,
#     naming key_sha256), valid once each placeholder is a fresh
#     `sluice new-key` hash; the filled-in ConfigMap config also with each
#     component's SLUICE_REDIS_URL (deploy/shipped_keys.py);
#   - compose.yaml parses, every file it mounts exists, every named volume
#     is declared, and the Redis its config names is a service Sluice
#     depends on;
#   - the compose demo profile: its one-shot demo-key service (the image's
#     demo-key target running deploy/compose/demo-key.sh) reads the compose
#     config, writes the demo config into a volume where the sluice service
#     reads it (SLUICE_CONFIG in the documented demo command), and the sluice
#     service waits for it only in that profile; the upstream it writes is
#     the simulator's listen port;
#   - the Dockerfile: the runtime image copies no config (no tenant), keeps
#     its health check, and reads /etc/sluice/sluice.toml.
# Usage: deploy/k8s/check.sh [path/to/sluice]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath "${1:-target/debug/sluice}")
venv=target/deploy-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate pyyaml
"$venv/bin/python" - "$BIN" <<'PY'
import copy, os, re, sys
from urllib.parse import urlsplit
import yaml
import kubernetes_validate
sys.dont_write_bytecode = True
sys.path.insert(0, "deploy")
import shipped_keys

BIN = sys.argv[1]
K8S_VERSION = "1.30.0"
base = "deploy/k8s/base"
problems = []

def load(path):
    with open(path) as f:
        return list(d for d in yaml.safe_load_all(f) if d)

def validate(d, where):
    if d["apiVersion"].startswith("monitoring.coreos.com/"):
        return  # a CRD: checked by hand below
    try:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"{where}: {e.message} at {'/'.join(map(str, e.path))}")

def check_config(toml, env=None):
    """Runs `sluice check-config` on TOML text; returns (ok, output)."""
    code, out = shipped_keys.check_config(BIN, toml, env)
    return code == 0, out

def shipped_config(toml, where, env=None):
    """A shipped config: refused for its placeholder keys, valid with fresh
    ones. Returns (the filled-in copy, check-config's output on it)."""
    found, filled, valid, out = shipped_keys.refused_then_filled(BIN, toml, where, env)
    problems.extend(found)
    return filled, valid, out

kust = load(f"{base}/kustomization.yaml")[0]
docs = {}
for res in kust["resources"]:
    for d in load(f"{base}/{res}"):
        docs[(d["kind"], d["metadata"]["name"])] = d
        validate(d, res)
print(f"k8s: {len(docs)} base resources validated against Kubernetes {K8S_VERSION}")

dep = docs[("Deployment", "sluice")]
pod_labels = dep["spec"]["template"]["metadata"]["labels"]
def selects(sel):
    return all(pod_labels.get(k) == v for k, v in sel.items())
if not selects(dep["spec"]["selector"]["matchLabels"]):
    problems.append("Deployment selector does not match its pod labels")
svc = docs[("Service", "sluice")]
if not selects(svc["spec"]["selector"]):
    problems.append("Service selector does not match the pods")
if not selects(docs[("PodDisruptionBudget", "sluice")]["spec"]["selector"]["matchLabels"]):
    problems.append("PodDisruptionBudget selects no pod")
if docs[("HorizontalPodAutoscaler", "sluice")]["spec"]["scaleTargetRef"]["name"] != "sluice":
    problems.append("HPA targets another Deployment")
container = dep["spec"]["template"]["spec"]["containers"][0]
ports = {p["name"] for p in container["ports"]}
for probe in ("readinessProbe", "livenessProbe"):
    if container[probe]["httpGet"]["port"] not in ports:
        problems.append(f"{probe} names an unknown port")
want = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
for probe, path in want.items():
    if container[probe]["httpGet"]["path"] != path:
        problems.append(f"{probe} should probe {path}")
sm = docs[("ServiceMonitor", "sluice")]
svc_ports = {p["name"] for p in svc["spec"]["ports"]}
for ep in sm["spec"]["endpoints"]:
    if ep["port"] not in svc_ports:
        problems.append(f"ServiceMonitor scrapes unknown Service port {ep['port']}")
if not all(svc["metadata"].get("labels", {}).get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
    problems.append("ServiceMonitor selects no Service")
sc = container["securityContext"]
if not (sc.get("readOnlyRootFilesystem") and not sc.get("allowPrivilegeEscalation", True)):
    problems.append("container must run with a read-only root fs and no privilege escalation")
if not dep["spec"]["template"]["spec"]["securityContext"].get("runAsNonRoot"):
    problems.append("pod must run as non-root")

# The config the pods run: refused until its placeholder keys are replaced,
# valid once they are (the rest of the checks use that filled-in copy); the
# drain must fit the grace.
shipped_toml = docs[("ConfigMap", "sluice-config")]["data"]["sluice.toml"]
toml, _, _ = shipped_config(shipped_toml, "ConfigMap sluice.toml")
grace = int(re.search(r"shutdown_grace_secs\s*=\s*(\d+)", toml).group(1))
pre = container["lifecycle"]["preStop"]["sleep"]["seconds"]
if dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] < grace + pre:
    problems.append("terminationGracePeriodSeconds must cover preStop + shutdown_grace_secs")

def merge(into, patch):
    """A strategic merge as kustomize does it for the fields used here:
    maps merge, lists of named items merge by name, other lists replace."""
    for key, val in patch.items():
        cur = into.get(key)
        if isinstance(val, dict) and isinstance(cur, dict):
            merge(cur, val)
        elif (isinstance(val, list) and isinstance(cur, list)
              and all(isinstance(x, dict) and "name" in x for x in val + cur)):
            by_name = {x["name"]: x for x in cur}
            for x in val:
                if x["name"] in by_name:
                    merge(by_name[x["name"]], x)
                else:
                    cur.insert(0, copy.deepcopy(x))  # kustomize puts new items first
        else:
            into[key] = copy.deepcopy(val)

def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

# Components: each is a kustomize Component whose resources are validated
# like the base's and whose patches, applied to the base, still validate.
# A Redis it ships (or a Secret it reads) must be what SLUICE_REDIS_URL names.
comp_root = "deploy/k8s/components"
components = sorted(os.listdir(comp_root)) if os.path.isdir(comp_root) else []
for comp in components:
    root = f"{comp_root}/{comp}"
    where = f"component {comp}"
    k = load(f"{root}/kustomization.yaml")[0]
    if (k.get("apiVersion"), k.get("kind")) != ("kustomize.config.k8s.io/v1alpha1", "Component"):
        problems.append(f"{where}: kustomization.yaml is not a kustomize Component")
    cdocs = {}
    for res in k.get("resources", []):
        for d in load(f"{root}/{res}"):
            ident = (d["kind"], d["metadata"]["name"])
            if ident in docs or ident in cdocs:
                problems.append(f"{where}: {res} redefines {ident[0]}/{ident[1]}")
            cdocs[ident] = d
            validate(d, f"{where}/{res}")
    patched = copy.deepcopy(docs)
    for p in k.get("patches", []):
        for d in load(os.path.join(root, p["path"])):
            ident = (d["kind"], d["metadata"]["name"])
            if ident not in patched:
                problems.append(f"{where}: patch targets unknown {ident[0]}/{ident[1]}")
                continue
            if ident == ("Deployment", "sluice"):
                names = {c["name"] for c in dep["spec"]["template"]["spec"]["containers"]}
                for c in d["spec"]["template"]["spec"].get("containers", []):
                    if c["name"] not in names:
                        problems.append(f"{where}: patch adds a container {c['name']!r} instead of patching one")
            merge(patched[ident], d)
            validate(patched[ident], f"{where}: {p['path']} applied to the base")

    # Every workload it adds: selectors, non-root, read-only, limits, probes.
    for (kind, name), d in cdocs.items():
        if kind != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not labels_match(d["spec"]["selector"]["matchLabels"], labels):
            problems.append(f"{where}: Deployment {name} selector does not match its pods")
        if labels_match(docs[("Service", "sluice")]["spec"]["selector"], labels):
            problems.append(f"{where}: Deployment {name}'s pods are selected by the sluice Service")
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{where}: Deployment {name} must run as non-root")
        for c in spec["containers"]:
            csc = c.get("securityContext", {})
            if not (csc.get("readOnlyRootFilesystem") and csc.get("allowPrivilegeEscalation") is False):
                problems.append(f"{where}: container {c['name']} needs a read-only root fs and no privilege escalation")
            lim = c.get("resources", {}).get("limits", {})
            if not ("memory" in lim and "cpu" in lim):
                problems.append(f"{where}: container {c['name']} needs cpu and memory limits")
            if "readinessProbe" not in c:
                problems.append(f"{where}: container {c['name']} has no readiness probe")
            if "redis" in c["image"] or "valkey" in c["image"]:
                argv = " ".join(c.get("command", []) + c.get("args", []))
                if not ("--maxmemory " in argv and "--maxmemory-policy allkeys-lru" in argv):
                    problems.append(f"{where}: Redis {c['name']} needs --maxmemory and --maxmemory-policy allkeys-lru")
                probe = " ".join(c.get("readinessProbe", {}).get("exec", {}).get("command", []))
                if "redis-cli" not in probe or "ping" not in probe:
                    problems.append(f"{where}: Redis {c['name']} should be ready on `redis-cli ping`")
    pods = [(d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
            for (kind, _), d in cdocs.items() if kind == "Deployment"]
    services = {}
    for (kind, name), d in cdocs.items():
        if kind == "Service":
            target = [spec for labels, spec in pods if labels_match(d["spec"]["selector"], labels)]
            if not target:
                problems.append(f"{where}: Service {name} selects no pod of the component")
                continue
            cports = {p.get("name") for c in target[0]["containers"] for p in c.get("ports", [])}
            cports |= {p["containerPort"] for c in target[0]["containers"] for p in c.get("ports", [])}
            for sp in d["spec"]["ports"]:
                if sp.get("targetPort", sp["port"]) not in cports:
                    problems.append(f"{where}: Service {name} targets unknown port {sp.get('targetPort')}")
            services[name] = {sp["port"] for sp in d["spec"]["ports"]}
        if kind == "NetworkPolicy":
            if not any(labels_match(d["spec"]["podSelector"].get("matchLabels", {}), labels) for labels, _ in pods):
                problems.append(f"{where}: NetworkPolicy {name} protects no pod of the component")
            sources = [f.get("podSelector", {}).get("matchLabels", {}) for r in d["spec"].get("ingress", []) for f in r.get("from", [])]
            if not any(labels_match(sel, pod_labels) for sel in sources):
                problems.append(f"{where}: NetworkPolicy {name} shuts out the Sluice pods")

    # SLUICE_REDIS_URL on the patched pods: names the component's Service (or
    # comes from a Secret), and the ConfigMap's config is valid with it.
    pdep = patched[("Deployment", "sluice")]["spec"]["template"]["spec"]["containers"][0]
    url_env = [e for e in pdep.get("env", []) if e["name"] == "SLUICE_REDIS_URL"]
    if url_env:
        e = url_env[0]
        if "value" in e:
            url = e["value"]
            u = urlsplit(url)
            if cdocs and (u.hostname not in services or (u.port or 6379) not in services[u.hostname]):
                problems.append(f"{where}: SLUICE_REDIS_URL {url} names no Service port of the component")
        else:
            ref = e.get("valueFrom", {}).get("secretKeyRef", {})
            if not (ref.get("name") and ref.get("key")):
                problems.append(f"{where}: SLUICE_REDIS_URL must be a value or a Secret key")
            if ref.get("name") == "sluice-upstream":
                problems.append(f"{where}: keep the Redis URL out of the upstream key's Secret")
            url = "rediss://:stand-in@redis.example.internal:6380/0"  # what the Secret would hold
        ok, out = check_config(toml, {"SLUICE_REDIS_URL": url})
        if not ok:
            problems.append(f"{where}: ConfigMap sluice.toml with SLUICE_REDIS_URL: {out.strip()}")
        elif not re.search(r"^shared state\s+redis .*limits shared", out, re.M):
            problems.append(f"{where}: with SLUICE_REDIS_URL, check-config does not report shared limits")
    print(f"k8s: component {comp}: {len(cdocs)} resources and {len(k.get('patches', []))} patches checked")

# Overlay: files exist, patches target base resources, components exist.
for overlay in sorted(os.listdir("deploy/k8s/overlays")):
    root = f"deploy/k8s/overlays/{overlay}"
    k = load(f"{root}/kustomization.yaml")[0]
    for res in k.get("resources", []):
        if not os.path.exists(os.path.join(root, res)):
            problems.append(f"overlay {overlay}: missing resource {res}")
    for c in k.get("components", []):
        path = os.path.normpath(os.path.join(root, c))
        if os.path.dirname(path) != os.path.normpath(comp_root) or os.path.basename(path) not in components:
            problems.append(f"overlay {overlay}: unknown component {c}")
    for p in k.get("patches", []):
        for d in load(os.path.join(root, p["path"])):
            if (d["kind"], d["metadata"]["name"]) not in docs:
                problems.append(f"overlay {overlay}: patch targets unknown {d['kind']}/{d['metadata']['name']}")
    print(f"k8s: overlay {overlay} checked")

# Compose: parses, mounts exist, its config is refused until its placeholder
# keys are replaced and valid once they are, its Redis is there.
compose = yaml.safe_load(open("deploy/compose.yaml"))
services = compose["services"]
named_volumes = compose.get("volumes") or {}
def mounts(svc):
    """{container path: (source, read_only)} of a service's short-form volumes."""
    out = {}
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out
for name, svc in services.items():
    for target, (source, _) in mounts(svc).items():
        if source.startswith((".", "/")):
            if not os.path.exists(os.path.join("deploy", source)):
                problems.append(f"compose {name}: mounts missing {source}")
        elif source not in named_volumes:
            problems.append(f"compose {name}: mounts undeclared volume {source}")
    b = svc.get("build")
    if b and not os.path.exists(os.path.join("deploy", b["context"], b["dockerfile"])):
        problems.append(f"compose {name}: missing Dockerfile")
compose_toml = open("deploy/compose/sluice.toml").read()
_, ok, out = shipped_config(compose_toml, "deploy/compose/sluice.toml")
m = re.search(r'^\[redis\][^\[]*?^url\s*=\s*"([^"]*)"', compose_toml, re.M | re.S)
if m and m.group(1):
    host = urlsplit(m.group(1)).hostname
    redis_svc = compose["services"].get(host)
    if redis_svc is None:
        problems.append(f"compose: [redis] url names {host}, which is no service")
    else:
        if host not in services["sluice"].get("depends_on", []):
            problems.append(f"compose: sluice does not depend on {host}")
        argv = " ".join(map(str, redis_svc.get("command", [])))
        if not ("--maxmemory " in argv and "--maxmemory-policy allkeys-lru" in argv):
            problems.append(f"compose {host}: needs --maxmemory and --maxmemory-policy allkeys-lru")
        if "healthcheck" not in redis_svc:
            problems.append(f"compose {host}: no healthcheck")
    if ok and not re.search(r"^shared state\s+redis .*limits shared", out, re.M):
        problems.append("deploy/compose/sluice.toml: check-config does not report shared limits")

# The demo profile: demo-key makes the key and the config; sluice reads it.
sluice_svc = services["sluice"]
sluice_mounts = mounts(sluice_svc)
operator_config = "/etc/sluice/sluice.toml"
if sluice_mounts.get(operator_config, (None,))[0] != "./compose/sluice.toml":
    problems.append(f"compose sluice: ./compose/sluice.toml is not mounted at {operator_config}")
env = sluice_svc.get("environment", {})
if env.get("SLUICE_CONFIG") != "${SLUICE_CONFIG:-%s}" % operator_config:
    problems.append(f"compose sluice: SLUICE_CONFIG should default to {operator_config} and take the demo's from the shell")
demo = services.get("demo-key")
script = open("deploy/compose/demo-key.sh").read()
def script_default(var):
    m = re.search(r"\$\{%s:-([^}]*)\}" % var, script)
    return m and m.group(1)
if demo is None:
    problems.append("compose: no demo-key service (the demo profile's key maker)")
else:
    if demo.get("profiles") != ["demo"]:
        problems.append("compose demo-key: should be in the demo profile only")
    if demo.get("restart", "no") != "no":
        problems.append("compose demo-key: a one-shot must not restart")
    b = demo.get("build", {})
    if (b.get("dockerfile"), b.get("target")) != ("deploy/Dockerfile", "demo-key"):
        problems.append("compose demo-key: should build deploy/Dockerfile's demo-key target")
    demo_mounts = mounts(demo)
    template, outdir = script_default("DEMO_TEMPLATE"), script_default("DEMO_DIR")
    if demo_mounts.get(template) != ("./compose/sluice.toml", True):
        problems.append(f"compose demo-key: ./compose/sluice.toml should be mounted read-only at {template}, where demo-key.sh reads it")
    vol, ro = demo_mounts.get(outdir, (None, True))
    if vol not in named_volumes or ro:
        problems.append(f"compose demo-key: needs a writable named volume at {outdir}, where demo-key.sh writes")
    readers = [t for t, (src, _) in sluice_mounts.items() if src == vol]
    demo_cmd = re.search(r"^#\s+(SLUICE_CONFIG=(\S+) docker compose -f deploy/compose.yaml --profile demo up)$",
                         open("deploy/compose.yaml").read(), re.M)
    if not readers:
        problems.append(f"compose sluice: does not mount the {vol} volume demo-key writes")
    elif not demo_cmd or demo_cmd.group(2) != f"{readers[0]}/sluice.toml":
        problems.append(f"compose.yaml: the demo command should set SLUICE_CONFIG={readers[0]}/sluice.toml")
    elif demo_cmd.group(1) not in open("README.md").read():
        problems.append(f"README.md does not give the demo command `{demo_cmd.group(1)}`")
    if "docker compose -f deploy/compose.yaml logs demo-key" not in open("README.md").read():
        problems.append("README.md does not say where the demo key is printed (logs demo-key)")
    dep = sluice_svc.get("depends_on", {})
    dep = dep.get("demo-key") if isinstance(dep, dict) else None
    if dep != {"condition": "service_completed_successfully", "required": False}:
        problems.append("compose sluice: should wait for demo-key (service_completed_successfully) only where it runs (required: false)")
    # The upstream demo-key.sh writes is the simulator's listen port.
    sim = services.get("simulator", {})
    up = urlsplit(script_default("DEMO_UPSTREAM_URL") or "")
    listen = " ".join(sim.get("command", []))
    if "demo" not in sim.get("profiles", []) or up.hostname != "simulator" or not listen.endswith(f":{up.port}"):
        problems.append(f"compose: demo-key.sh's upstream {up.geturl()} is not the demo profile's simulator ({listen})")
    # It prints the key (the printed key is checked live by deploy/check.sh).
    if not re.search(r"^key: +\$key$", script, re.M):
        problems.append("demo-key.sh: does not print the key")

# The image: the runtime stage holds no config (so no tenant), checks its
# health, reads /etc/sluice/sluice.toml; the demo-key stage runs demo-key.sh.
stages = {}
name = None
for raw in open("deploy/Dockerfile").read().replace("\\\n", " ").splitlines():
    line = raw.strip()
    if not line or line.startswith("#"):
        continue
    if line.upper().startswith("FROM "):
        words = line.split()
        name = words[3] if len(words) > 3 and words[2].upper() == "AS" else f"stage{len(stages)}"
        stages[name] = []
    stages[name].append(line)
runtime = stages[name]  # the last stage: what `docker build` makes
for line in runtime:
    if line.upper().startswith(("COPY", "ADD")) and (".toml" in line or "config" in line.split()[-1]):
        problems.append(f"Dockerfile: the runtime image must hold no config (no tenant): {line}")
if not any(l.upper().startswith("HEALTHCHECK") and "healthcheck" in l for l in runtime):
    problems.append("Dockerfile: the runtime image lost its HEALTHCHECK")
if not any(f"SLUICE_CONFIG={operator_config}" in l for l in runtime):
    problems.append(f"Dockerfile: SLUICE_CONFIG should be {operator_config}")
dk = stages.get("demo-key", [])
if not any("deploy/compose/demo-key.sh" in l for l in dk) or not any(l.startswith("ENTRYPOINT") and "demo-key.sh" in l for l in dk):
    problems.append("Dockerfile: the demo-key stage should copy and run deploy/compose/demo-key.sh")
print(f"compose: {len(services)} services checked, the demo profile's key maker wired to the gateway")
print(f"image: {len(stages)} stages; the runtime image holds no config")

if problems:
    print("\n".join(f"PROBLEM: {p}" for p in problems))
    sys.exit(1)
PY

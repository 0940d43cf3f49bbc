#!/usr/bin/env bash
# Offline checks of deploy/k8s and deploy/compose.yaml:
#   - every base manifest against the Kubernetes schemas (kubernetes-validate
#     from PyPI ships them), strictly;
#   - cross-references: selectors, probe ports, HPA/PDB targets, the
#     ServiceMonitor's port, overlay patches and files;
#   - the ConfigMap's sluice.toml and the compose config through
#     `sluice check-config`;
#   - compose.yaml parses and every file it mounts exists.
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
import os, subprocess, sys, tempfile
import yaml
import kubernetes_validate

BIN = sys.argv[1]
K8S_VERSION = "1.30.0"
base = "deploy/k8s/base"
problems = []

def load(path):
    with open(path) as f:
        return list(d for d in yaml.safe_load_all(f) if d)

kust = load(f"{base}/kustomization.yaml")[0]
docs = {}
for res in kust["resources"]:
    for d in load(f"{base}/{res}"):
        docs[(d["kind"], d["metadata"]["name"])] = d
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked by hand below
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{res}: {e.message} at {'/'.join(map(str, e.path))}")
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

# The config the pods run must be valid, and the drain must fit the grace.
toml = docs[("ConfigMap", "sluice-config")]["data"]["sluice.toml"]
with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
    f.write(toml)
r = subprocess.run([BIN, "check-config", "--config", f.name], capture_output=True, text=True)
os.unlink(f.name)
if r.returncode != 0:
    problems.append(f"ConfigMap sluice.toml: {r.stderr.strip()}")
import re
grace = int(re.search(r"shutdown_grace_secs\s*=\s*(\d+)", toml).group(1))
pre = container["lifecycle"]["preStop"]["sleep"]["seconds"]
if dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] < grace + pre:
    problems.append("terminationGracePeriodSeconds must cover preStop + shutdown_grace_secs")

# Overlay: files exist, patches target base resources.
for overlay in sorted(os.listdir("deploy/k8s/overlays")):
    root = f"deploy/k8s/overlays/{overlay}"
    k = load(f"{root}/kustomization.yaml")[0]
    for res in k.get("resources", []):
        if not os.path.exists(os.path.join(root, res)):
            problems.append(f"overlay {overlay}: missing resource {res}")
    for p in k.get("patches", []):
        for d in load(os.path.join(root, p["path"])):
            if (d["kind"], d["metadata"]["name"]) not in docs:
                problems.append(f"overlay {overlay}: patch targets unknown {d['kind']}/{d['metadata']['name']}")
    print(f"k8s: overlay {overlay} checked")

# Compose: parses, mounts exist, its config is valid.
compose = yaml.safe_load(open("deploy/compose.yaml"))
for name, svc in compose["services"].items():
    for v in svc.get("volumes", []):
        host = v.split(":")[0]
        if not os.path.exists(os.path.join("deploy", host)):
            problems.append(f"compose {name}: mounts missing {host}")
    b = svc.get("build")
    if b and not os.path.exists(os.path.join("deploy", b["context"], b["dockerfile"])):
        problems.append(f"compose {name}: missing Dockerfile")
r = subprocess.run([BIN, "check-config", "--config", "deploy/compose/sluice.toml"], capture_output=True, text=True)
if r.returncode != 0:
    problems.append(f"deploy/compose/sluice.toml: {r.stderr.strip()}")
print(f"compose: {len(compose['services'])} services checked")

if problems:
    print("\n".join(f"PROBLEM: {p}" for p in problems))
    sys.exit(1)
PY

#!/usr/bin/env bash
# Checks the shipped deployment files with the tools that read them:
#   - deploy/k8s/*.yaml against the Kubernetes schema (kubernetes-validate from PyPI,
#     strict: unknown fields are errors), for the Kubernetes version below;
#   - the node configuration inside deploy/k8s/config.yaml with `troupe node --check-config`
#     as every pod name of the StatefulSet would use it;
#   - deploy/prometheus.yml and deploy/alerts.yml with promtool, when it is installed (the
#     cluster test runs them against live nodes).
# Usage: scripts/check-deploy.sh [path of the troupe binary, default target/debug/troupe]
set -euo pipefail
cd "$(dirname "$0")/.."
troupe="${1:-target/debug/troupe}"
k8s_version="1.33.0"
venv="${TROUPE_DEPLOY_VENV:-target/deploy-venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0"
fi
"$venv/bin/kubernetes-validate" --strict --kubernetes-version "$k8s_version" deploy/k8s/*.yaml

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The node.toml of the ConfigMap, as Kubernetes mounts it.
"$venv/bin/python" - deploy/k8s/config.yaml "$tmp/node.toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "troupe-config")
open(sys.argv[2], "w").write(cm["data"]["node.toml"])
PY
# The seeds (listed) and pods beyond them (described by `advertise`).
for i in $(seq 0 9); do
  TROUPE_NODE_NAME="troupe-$i" TROUPE_HTTP_ADDR="0.0.0.0:8080" TROUPE_CLUSTER_COOKIE="check-only" \
    "$troupe" node --config "$tmp/node.toml" --check-config
done

if command -v promtool >/dev/null 2>&1; then
  (cd deploy && promtool check config prometheus.yml)
else
  echo "promtool not installed: prometheus.yml and alerts.yml not checked here"
fi

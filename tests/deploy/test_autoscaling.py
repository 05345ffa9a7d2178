"""The autoscaling objects tell the truth about where work waits.

The queue of waiting requests lives in the store and the scheduler hands a request to one
worker's own inbox topic only when it has a free slot: there is no `worker.<type>.requests`
topic nor `worker.<type>` consumer group whose lag would measure waiting work. The workers'
HPAs (deploy/k8s/ and the Helm chart) therefore scale on the service's own
`enginedge_queue_depth`, served by prometheus-adapter (deploy/prometheus-adapter/), or, as an
alternative, through KEDA's Prometheus scaler (deploy/keda/). These tests check that those
files agree with each other and with the manifests, that the files outside deploy/k8s/ pass
the same offline linters (or, for KEDA's CRDs, which kubernetes-validate has no schema for,
a check of their shape), and, where `promtool` is installed, that the query adds up what the
replicas export without counting it once per replica.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_deploy_lint import BIN, ROOT, helm  # noqa: F401 (the fixture)

K8S = ROOT / "deploy/k8s"
CHART = ROOT / "deploy/helm/main-hexagon"
ADAPTER = ROOT / "deploy/prometheus-adapter"
KEDA = ROOT / "deploy/keda/scaledobjects.yaml"
METRIC = "enginedge_queue_depth"
NAMESPACE = "enginedge"
YAMLLINT_RULES = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"

Doc = dict[str, Any]


def docs(*paths: Path) -> list[Doc]:
    found: list[Doc] = []
    for path in paths:
        found.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return found


def manifests() -> list[Doc]:
    return docs(*sorted(K8S.glob("*.yaml")))


def rendered(helm_bin: Path, *args: str) -> list[Doc]:
    done = subprocess.run(
        [str(helm_bin), "template", "main-hexagon", str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(objects: list[Doc], kind: str) -> dict[str, Doc]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def worker_deployments(objects: list[Doc]) -> dict[str, str]:
    """Deployment name -> worker type, for the workers' Deployments."""
    return {
        name: d["metadata"]["labels"]["worker-type"]
        for name, d in by_kind(objects, "Deployment").items()
        if "worker-type" in d["metadata"]["labels"]
    }


def hpa_of(objects: list[Doc], deployment: str) -> Doc:
    hpas = [
        h
        for h in by_kind(objects, "HorizontalPodAutoscaler").values()
        if h["spec"]["scaleTargetRef"]
        == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment}
    ]
    assert len(hpas) == 1, f"{deployment}: {len(hpas)} HPAs"
    return hpas[0]


def external_metrics(hpa: Doc) -> list[Doc]:
    return [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]


def check_worker_hpas(objects: list[Doc]) -> dict[str, Doc]:
    """Every worker Deployment has one HPA, on CPU and on its own type's queue depth."""
    workers = worker_deployments(objects)
    assert set(workers.values()) == {"data-processing", "llm"}, workers
    found = {}
    for deployment, worker_type in workers.items():
        hpa = hpa_of(objects, deployment)
        (queue,) = external_metrics(hpa)
        assert queue["metric"] == {
            "name": METRIC,
            "selector": {"matchLabels": {"worker_type": worker_type}},
        }, queue
        # Waiting work only (running requests are not in the metric): a fleet-wide Value,
        # not a per-pod AverageValue, which would shrink a saturated fleet.
        assert queue["target"]["type"] == "Value", queue
        assert float(queue["target"]["value"]) > 0
        resources = [
            m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"
        ]
        assert resources == ["cpu"], resources
        assert hpa["spec"]["minReplicas"] >= 1
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
        found[worker_type] = hpa
    service = by_kind(objects, "HorizontalPodAutoscaler")["main-hexagon-hpa"]
    assert [m["type"] for m in service["spec"]["metrics"]] == ["Resource", "Resource"], service
    return found


# -- nothing names the old dispatch path

STALE = {
    "kafka_consumergroup_lag": re.compile(r"kafka_consumergroup_lag"),
    "the topic worker.<type>.requests": re.compile(
        r"worker\.(<type>|llm|data-processing|\{\{[^}]*\}\})\.requests"
    ),
    "the consumer group worker.<type>": re.compile(r"consumergroup|consumer group worker\."),
    "DISPATCH_TIMEOUT": re.compile(r"DISPATCH_TIMEOUT"),
    "enginedge_dispatch_latency_seconds": re.compile(r"dispatch_latency"),
    "the chart's kafkaLag values": re.compile(r"kafkaLag"),
}


def deployment_files() -> list[Path]:
    files = [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    return sorted([*files, ROOT / "docker-compose.dev.yml"])


@pytest.mark.parametrize("path", deployment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_deployment_file_names_the_old_dispatch_path(path: Path) -> None:
    text = path.read_text()
    for what, pattern in STALE.items():
        match = pattern.search(text)
        assert match is None, f"{path.relative_to(ROOT)} still names {what}: {match.group(0)!r}"


# -- the HPAs


def test_the_manifests_scale_each_worker_type_on_its_queue_depth() -> None:
    hpas = check_worker_hpas(manifests())
    assert {t: h["spec"]["metrics"][1]["external"]["target"]["value"] for t, h in hpas.items()} == {
        "data-processing": "20",
        "llm": "5",
    }


@pytest.mark.parametrize("values", ["default", "ci/all-on-values.yaml"])
def test_the_chart_scales_each_worker_type_on_its_queue_depth(
    helm: Path,  # noqa: F811 (the fixture)
    values: str,
) -> None:
    args = [] if values == "default" else ["-f", str(CHART / values)]
    objects = rendered(helm, *args)
    chart = {t: h["spec"] for t, h in check_worker_hpas(objects).items()}
    k8s = {t: h["spec"] for t, h in check_worker_hpas(manifests()).items()}
    assert chart == k8s


def test_an_external_autoscaler_gets_the_replica_count_to_itself(
    helm: Path,  # noqa: F811 (the fixture)
) -> None:
    objects = rendered(helm, "-f", str(CHART / "ci/external-autoscaler-values.yaml"))
    workers = worker_deployments(objects)
    assert len(workers) == 2
    assert list(by_kind(objects, "HorizontalPodAutoscaler")) == ["main-hexagon-hpa"]
    for name in workers:
        assert "replicas" not in by_kind(objects, "Deployment")[name]["spec"]
    # And with autoscaling off, the chart's replica count again.
    off = rendered(helm, "--set", "workers.llm.autoscaling.enabled=false")
    assert by_kind(off, "Deployment")["main-hexagon-worker-llm"]["spec"]["replicas"] == 2
    assert "main-hexagon-worker-llm-hpa" not in by_kind(off, "HorizontalPodAutoscaler")


def test_the_service_pods_are_scrapeable_and_the_workers_read_the_partition_count(
    helm: Path,  # noqa: F811 (the fixture)
) -> None:
    for objects in (manifests(), rendered(helm)):
        deployments = by_kind(objects, "Deployment")
        annotations = deployments["main-hexagon"]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "3000"
        assert annotations["prometheus.io/path"] == "/metrics"
        for name in worker_deployments(objects):
            env = {
                e["name"]
                for e in deployments[name]["spec"]["template"]["spec"]["containers"][0]["env"]
            }
            assert "KAFKA_PARTITIONS" in env, name  # an inbox gets the configured partitions


def test_the_configuration_names_the_scheduling_settings() -> None:
    configmap = by_kind(manifests(), "ConfigMap")["main-hexagon-config"]
    assert configmap["data"]["PRIORITY_AGING"] == "5"
    assert "DISPATCH_TIMEOUT" not in configmap["data"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["config"] == configmap["data"]
    for text in ((K8S / "10-configmap.yaml").read_text(), (CHART / "values.yaml").read_text()):
        # Unset means unlimited: shown, commented out.
        assert '# TENANT_MAX_RUNNING: "' in text and '# TENANT_MAX_QUEUED: "' in text
    secret = by_kind(manifests(), "Secret")["main-hexagon-secrets"]
    assert {"API_KEYS", "ADMIN_API_KEYS"} <= set(secret["stringData"])
    assert "ADMIN_API_KEYS" in values["secrets"]["optionalKeys"]
    env = by_kind(manifests(), "Deployment")["main-hexagon"]["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    (admin,) = [e for e in env if e["name"] == "ADMIN_API_KEYS"]
    assert admin["valueFrom"]["secretKeyRef"]["optional"] is True


# -- prometheus-adapter


def adapter_rules() -> tuple[list[Doc], list[Doc]]:
    values = yaml.safe_load((ADAPTER / "values.yaml").read_text())
    (configmap,) = docs(ADAPTER / "rules-configmap.yaml")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert set(config) == {"externalRules"}
    return values["rules"]["external"], config["externalRules"]


def test_the_adapter_rule_is_the_same_in_both_files_and_serves_the_hpas_metric() -> None:
    from_values, from_configmap = adapter_rules()
    assert from_values == from_configmap
    (rule,) = from_values
    assert rule["name"]["as"] == METRIC
    assert yaml.safe_load((CHART / "values.yaml").read_text())["queueDepthMetric"]["name"] == METRIC
    assert rule["seriesQuery"].startswith(f"{METRIC}{{")
    assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}}}
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]


def test_the_adapter_files_pass_the_linters() -> None:
    for tool in ("yamllint", "kubernetes-validate"):
        if not (BIN / tool).exists():
            pytest.skip(f"{BIN / tool} is missing: run `make lint-deploy`")
    files = [str(ADAPTER / "values.yaml"), str(ADAPTER / "rules-configmap.yaml"), str(KEDA)]
    subprocess.run([str(BIN / "yamllint"), "--strict", "-d", YAMLLINT_RULES, *files], check=True)
    subprocess.run(
        [
            str(BIN / "kubernetes-validate"),
            "--strict",
            "--quiet",
            str(ADAPTER / "rules-configmap.yaml"),
        ],
        check=True,
    )


# -- KEDA


def test_the_keda_scaled_objects_match_the_hpas() -> None:
    """kubernetes-validate has no schema for KEDA's CRDs: check the shape the KEDA 2.x
    ScaledObject (keda.sh/v1alpha1) takes, and that it scales as the HPAs do."""
    objects = manifests()
    workers = worker_deployments(objects)
    (rule,) = adapter_rules()[0]
    scaled = docs(KEDA)
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(workers)
    for s in scaled:
        assert s["apiVersion"] == "keda.sh/v1alpha1" and s["kind"] == "ScaledObject"
        assert s["metadata"]["namespace"] == NAMESPACE
        assert set(s["spec"]) <= {
            "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
            "cooldownPeriod", "advanced", "triggers",
        }  # fmt: skip
        target = s["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target["name"]}
        worker_type = workers[target["name"]]
        hpa = hpa_of(objects, target["name"])["spec"]
        assert s["spec"]["minReplicaCount"] == hpa["minReplicas"] >= 1
        assert s["spec"]["maxReplicaCount"] == hpa["maxReplicas"]
        assert s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
        prometheus, cpu = s["spec"]["triggers"]
        assert prometheus["type"] == "prometheus" and prometheus["metricType"] == "Value"
        assert set(prometheus["metadata"]) == {"serverAddress", "query", "threshold"}
        (queue,) = [m["external"] for m in hpa["metrics"] if m["type"] == "External"]
        assert prometheus["metadata"]["threshold"] == queue["target"]["value"]
        # The adapter's query, with what the adapter puts in for this HPA.
        assert prometheus["metadata"]["query"] == adapter_query(rule, worker_type)
        assert cpu == {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}


def adapter_query(rule: Doc, worker_type: str, namespace: str = NAMESPACE) -> str:
    """The PromQL prometheus-adapter runs for an HPA in ``namespace`` whose selector is
    ``worker_type: <worker_type>``."""
    matchers = f'namespace="{namespace}",worker_type="{worker_type}"'
    query: str = rule["metricsQuery"]
    return query.replace("<<.Series>>", METRIC).replace("<<.LabelMatchers>>", matchers)


# -- the query's arithmetic, with Prometheus's own rule tester


def promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed (Debian's `prometheus` package has it)")
    return found


def test_the_query_counts_each_waiting_request_once_whatever_the_replicas(tmp_path: Path) -> None:
    """Three replicas export the same fleet-wide gauge, per priority: the adapter's query
    must give the fleet's total per worker type, not three times it, and ignore another
    namespace's service; a replica that has not yet seen the newest count (a scrape a
    moment behind) does not add to it either."""
    tool = promtool()
    (rule,) = adapter_rules()[0]
    series = []
    for replica in ("a", "b", "c"):
        labels = f'namespace="{NAMESPACE}",pod="main-hexagon-{replica}"'
        series += [
            (
                f'{METRIC}{{{labels},worker_type="llm",priority="0"}}',
                "7" if replica != "c" else "6",
            ),
            (f'{METRIC}{{{labels},worker_type="llm",priority="50"}}', "3"),
            (f'{METRIC}{{{labels},worker_type="data-processing",priority="0"}}', "0"),
        ]
    series.append(
        (f'{METRIC}{{namespace="staging",pod="x",worker_type="llm",priority="0"}}', "100")
    )
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": f"{v}x4"} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": adapter_query(rule, "llm"),
                        "eval_time": "30s",
                        "exp_samples": [{"labels": '{worker_type="llm"}', "value": 10}],
                    },
                    {
                        "expr": adapter_query(rule, "data-processing"),
                        "eval_time": "30s",
                        "exp_samples": [{"labels": '{worker_type="data-processing"}', "value": 0}],
                    },
                ],
            }
        ],
    }
    file = tmp_path / "queue-depth-test.yaml"
    file.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [tool, "test", "rules", str(file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, textwrap.indent(done.stdout + done.stderr, "  ")

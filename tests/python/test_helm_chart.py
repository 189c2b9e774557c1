"""The Helm chart: lints strictly, renders manifests that validate against the Kubernetes 1.32
schemas, probes the gRPC health service natively, and renders a configuration file the real
server binary accepts."""

import subprocess
import tomllib

import pytest
import yaml

from conftest import ROOT, SERVER_BIN

CHART = ROOT / "deploy" / "helm" / "polyhead"
HELM = ROOT / ".cache" / "tools" / "helm"
VALIDATE = ROOT / ".venv" / "bin" / "kubernetes-validate"


def helm(*args: str) -> str:
    assert HELM.exists(), f"{HELM} is missing: run `make test`"
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(*sets: str) -> list[dict]:
    args = ["template", "release", str(CHART)]
    for s in sets:
        args += ["--set", s]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


def kind(docs, name):
    return next(d for d in docs if d["kind"] == name)


def test_chart_lints_strictly():
    helm("lint", "--strict", str(CHART))


def test_manifests_validate_against_kubernetes_schemas():
    manifests = helm("template", "release", str(CHART))
    result = subprocess.run(
        [str(VALIDATE), "-k", "1.32.0", "--strict", "-"],
        input=manifests, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_probes_use_grpc_health_and_pods_run_unprivileged():
    deployment = kind(rendered(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "polyhead.v1.Polyhead"}
    assert container["startupProbe"]["grpc"]["port"] == 50051
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_config_changes_roll_the_pods():
    checksum = lambda docs: kind(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum(rendered()) != checksum(rendered("config.device=cuda:0"))


@pytest.mark.parametrize("extra", [(), ("config.max-frames=16", "config.allow-cpu-fallback=true")])
def test_rendered_config_is_accepted_by_the_server(tmp_path, extra):
    toml_text = kind(rendered(*extra), "ConfigMap")["data"]["polyhead.toml"]
    path = tmp_path / "polyhead.toml"
    path.write_text(toml_text)
    result = subprocess.run(
        [str(SERVER_BIN), "--config", str(path), "--print-config"],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["listen"] == "0.0.0.0:50051"
    assert effective["metrics-listen"] == "0.0.0.0:9464"
    assert effective["cache-bytes"] == 268435456
    if extra:
        assert effective["max-frames"] == 16 and effective["allow-cpu-fallback"] is True

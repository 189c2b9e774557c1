"""The Helm chart and the image: the chart lints strictly, renders manifests that validate
against the Kubernetes 1.32 schemas, probes the gRPC health service natively, and renders a
configuration file the real server binary accepts and that governs the server inside the image
(whose Dockerfile sets no environment variable that would override it)."""

import json
import shlex
import subprocess
import tomllib

import pytest
import yaml

from conftest import ROOT, SERVER_BIN

CHART = ROOT / "deploy" / "helm" / "polyhead"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
HELM = ROOT / ".cache" / "tools" / "helm"
VALIDATE = ROOT / ".venv" / "bin" / "kubernetes-validate"


def run_helm(*args: str) -> subprocess.CompletedProcess:
    assert HELM.exists(), f"{HELM} is missing: run `make test`"
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)


def helm(*args: str) -> str:
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def template_args(*sets: str) -> list[str]:
    args = ["template", "release", str(CHART)]
    for s in sets:
        args += ["--set", s]
    return args


def rendered(*sets: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(helm(*template_args(*sets))) if doc]


def kind(docs, name):
    return next(d for d in docs if d["kind"] == name)


def test_chart_lints_strictly():
    helm("lint", "--strict", str(CHART))


@pytest.mark.parametrize("sets", [
    (),
    ("auth.existingSecret=polyhead-token", "preStopSleepSeconds=0"),
    ("podDisruptionBudget.enabled=true", "replicaCount=3"),
])
def test_manifests_validate_against_kubernetes_schemas(sets):
    manifests = helm(*template_args(*sets))
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
    assert effective["max-receiving-bytes"] == 1 << 30
    assert effective["max-decoding-bytes"] == 1 << 30
    assert effective["intra-threads"] == 2
    if extra:
        assert effective["max-frames"] == 16 and effective["allow-cpu-fallback"] is True


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in binary units ("4Gi") as bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(quantity[:-2]) * units[quantity[-2:]]


def test_memory_limit_leaves_room_beyond_the_caches_and_the_budgets():
    docs = rendered()
    config = tomllib.loads(kind(docs, "ConfigMap")["data"]["polyhead.toml"])
    container = kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    held = sum(config[key] for key in
               ("cache-bytes", "handle-bytes", "max-receiving-bytes", "max-decoding-bytes"))
    # The rest holds the weights, the runtime's buffers and the rest of the process.
    assert limit - held >= 2 << 30, (limit, held)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), `\\` continuations joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        # Docker drops comment lines, inside a continued instruction too.
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def image_env() -> dict[str, str]:
    """The variables the image's ENV instructions set (`ENV a=b c=d` and `ENV a b`)."""
    env = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword != "ENV":
            continue
        words = shlex.split(arguments)
        if "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def image_cmd() -> list[str]:
    return json.loads(next(a for k, a in dockerfile_instructions() if k == "CMD"))


def copied_from_context(destination: str):
    """The build-context file a `COPY` (without --from) puts at `destination`."""
    for keyword, arguments in dockerfile_instructions():
        words = arguments.split()
        if keyword == "COPY" and not words[0].startswith("--") and words[-1] == destination:
            return ROOT / words[0]
    raise AssertionError(f"the Dockerfile copies nothing from the context to {destination}")


def effective_config(args: list[str], files: dict, extra_env: dict | None = None) -> dict:
    """`--print-config` of the server run as in the image: its ENV, its entrypoint's `args`, with
    the in-image paths in `files` mapped to local files."""
    args = [str(files.get(a, a)) for a in args]
    env = {"PATH": "/usr/bin:/bin", **image_env(), **(extra_env or {})}
    result = subprocess.run(
        [str(SERVER_BIN), *args, "--print-config"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return tomllib.loads(result.stdout)


def test_charts_config_governs_the_server_in_the_image(tmp_path):
    docs = rendered("config.models=/srv/models/my-set", "service.grpcPort=6000")
    path = tmp_path / "polyhead.toml"
    path.write_text(kind(docs, "ConfigMap")["data"]["polyhead.toml"])
    container = kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    mounted = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    effective = effective_config(container["args"], {f"{mounted}/polyhead.toml": path})
    assert effective["models"] == "/srv/models/my-set"
    assert effective["listen"] == "0.0.0.0:6000"
    assert container["readinessProbe"]["grpc"]["port"] == 6000
    assert container["startupProbe"]["grpc"]["port"] == 6000


def test_images_default_config_is_accepted_and_listens_on_all_interfaces():
    cmd = image_cmd()
    config_path = cmd[cmd.index("--config") + 1]
    files = {config_path: copied_from_context(config_path)}
    effective = effective_config(cmd, files)
    assert effective["listen"] == "0.0.0.0:50051"
    assert effective["metrics-listen"] == "0.0.0.0:9464"
    assert effective["models"] == "/srv/polyhead/models/tiny"
    # `docker run -e` still overrides the file.
    overridden = effective_config(cmd, files, {"POLYHEAD_MODELS": "/data/my-set"})
    assert overridden["models"] == "/data/my-set"


@pytest.mark.parametrize("key, pointer", [
    ("listen", "service.grpcPort"),
    ("metrics-listen", "service.metricsPort"),
    ("metrics_listen", "service.metricsPort"),
])
def test_addresses_the_chart_sets_cannot_be_set_twice(key, pointer):
    result = run_helm(*template_args(f"config.{key}=0.0.0.0:7000"))
    assert result.returncode != 0
    assert f"config.{key} cannot be set" in result.stderr and pointer in result.stderr


@pytest.mark.parametrize("key", ["tls-cert", "tls_key", "tls-client-ca"])
def test_tls_is_refused_with_where_to_terminate_it(key):
    result = run_helm(*template_args(f"config.{key}=/etc/polyhead/tls.pem"))
    assert result.returncode != 0
    assert f"config.{key} cannot be set" in result.stderr and "in front of the Service" in result.stderr


def test_scrape_annotations_follow_the_metrics_port():
    annotations = lambda *sets: kind(rendered(*sets), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations()["prometheus.io/port"] == "9464"
    assert annotations("service.metricsPort=9100")["prometheus.io/port"] == "9100"
    assert annotations()["prometheus.io/scrape"] == "true"
    assert "prometheus.io/scrape" not in annotations("prometheusAnnotations=false")
    assert "prometheus.io/scrape" not in annotations("config.no-metrics=true")


@pytest.mark.parametrize("sets, sleep, grace", [
    ((), 5, 5 + 25 + 5),
    (("preStopSleepSeconds=10", "config.drain-timeout-seconds=40"), 10, 10 + 40 + 5),
    (("preStopSleepSeconds=0",), None, 0 + 25 + 5),
    (("terminationGracePeriodSeconds=120",), 5, 120),
])
def test_pods_leave_the_endpoints_before_the_drain_and_get_time_for_it(sets, sleep, grace):
    pod = kind(rendered(*sets), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if sleep is None:
        assert "lifecycle" not in container
    else:
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]
    assert pod["terminationGracePeriodSeconds"] == grace


def test_a_drain_set_in_env_gets_its_grace_period_or_asks_for_one():
    def grace(*args: str):
        docs = yaml.safe_load_all(helm("template", "release", str(CHART), *args))
        return kind([d for d in docs if d], "Deployment")["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"]

    drain = ["--set", "env[0].name=OTHER", "--set-string", "env[0].value=1",
             "--set", "env[1].name=POLYHEAD_DRAIN_TIMEOUT_SECONDS"]
    # The environment overrides config, as in the server; a fraction of a second rounds up.
    assert grace(*drain, "--set-string", "env[1].value=50") == 5 + 50 + 5
    assert grace(*drain, "--set-string", "env[1].value=12.2",
                 "--set", "config.drain-timeout-seconds=99") == 5 + 13 + 5
    assert grace("--set", "config.drain-timeout-seconds=40.5") == 5 + 41 + 5
    hidden = [*drain, "--set", "env[1].valueFrom.secretKeyRef.name=s",
              "--set", "env[1].valueFrom.secretKeyRef.key=k"]
    result = run_helm("template", "release", str(CHART), *hidden)
    assert result.returncode != 0
    assert "set terminationGracePeriodSeconds" in result.stderr, result.stderr
    assert grace(*hidden, "--set", "terminationGracePeriodSeconds=70") == 70


def test_helm_test_sends_the_token_the_server_accepts():
    docs = rendered("auth.existingSecret=polyhead-token", "auth.secretKey=bearer")
    config = tomllib.loads(kind(docs, "ConfigMap")["data"]["polyhead.toml"])
    pod = kind(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "auth")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "auth")
    assert volume["secret"]["secretName"] == "polyhead-token"
    assert volume["secret"]["items"] == [{"key": "bearer", "path": "bearer"}]
    assert config["auth-token-file"] == f"{mount['mountPath']}/bearer"
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    env = test_pod["spec"]["containers"][0]["env"]
    secret = {"secretKeyRef": {"name": "polyhead-token", "key": "bearer"}}
    assert env == [{"name": "POLYHEAD_TOKEN", "valueFrom": secret}]
    result = run_helm(*template_args("auth.existingSecret=t", "config.auth-token-file=/x"))
    assert result.returncode != 0 and "auth.existingSecret" in result.stderr


def test_helm_test_pod_is_pulled_and_scheduled_as_the_servers_pods_are():
    sets = (
        "imagePullSecrets[0].name=registry",
        "nodeSelector.pool=gpu",
        "tolerations[0].key=nvidia.com/gpu",
        "tolerations[0].operator=Exists",
        "tolerations[0].effect=NoSchedule",
        "image.pullPolicy=Always",
    )
    docs = rendered(*sets)
    server = kind(docs, "Deployment")["spec"]["template"]["spec"]
    test_pod = next(d for d in docs if d["kind"] == "Pod")["spec"]
    for key in ("imagePullSecrets", "nodeSelector", "tolerations"):
        assert test_pod[key] == server[key], key
    assert test_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert test_pod["containers"][0]["imagePullPolicy"] == "Always"


def test_disruption_budget_is_optional_and_selects_the_servers_pods():
    assert not [d for d in rendered() if d["kind"] == "PodDisruptionBudget"]
    docs = rendered("podDisruptionBudget.enabled=true", "replicaCount=3")
    budget = kind(docs, "PodDisruptionBudget")["spec"]
    pods = kind(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert budget["selector"]["matchLabels"] == pods
    assert budget["minAvailable"] == 1 and "maxUnavailable" not in budget
    budget = kind(rendered("podDisruptionBudget.enabled=true", "podDisruptionBudget.maxUnavailable=25%"),
                  "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == "25%" and "minAvailable" not in budget

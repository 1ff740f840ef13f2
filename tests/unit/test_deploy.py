"""The deployment files, checked offline: the Kubernetes manifests against the bundled
Kubernetes schemas (kubernetes-validate, strict) and the prometheus-operator CRD schemas
vendored in deploy/schemas/, every alert expression parsed as PromQL, the compose file
against the Compose Specification's schema, every environment variable they set against
the settings the code reads, and the Dockerfile with hadolint. Also the container's
start-up notice about IMAGEGEN_PUBLIC_URL."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from imagegen.config import SETTINGS, Settings
from imagegen.server import public_url_notice

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"

#: The oldest Kubernetes minor the manifests promise to work on, and the newest bundled.
K8S_VERSIONS = ("1.30", "1.37")
#: Kinds without a bundled schema, checked against the vendored CRDs instead.
CRD_FILES = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}
#: Settings that may only come from the Secret, never from the ConfigMap or a literal.
SECRET_SETTINGS = frozenset(
    {
        "DATABASE_URL",
        "IMAGEGEN_JWT_KEY",
        "IMAGEGEN_WEBHOOK_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "OPENAI_API_KEY",
        "BUILT_IN_FORGE_API_KEY",
        "IMAGEGEN_MODERATION_API_KEY",
    }
)


# --- loading ---------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every resource the kustomization applies."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return tuple(
        (name, doc) for name in kustomization["resources"] for doc in load_all(K8S / name)
    )


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def secret_example() -> dict[str, Any]:
    (secret,) = load_all(SECRET_EXAMPLE)
    return secret


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("Deployment", "Job"):
        for doc in of_kind(kind):
            yield f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps and Secrets (the example's
    values for the Secret), then its own `env` entries, as Kubernetes merges them."""
    secret = secret_example()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
            env.update(secret["stringData"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[entry["name"]] = secret["stringData"][ref["key"]]
    return env


def server_container() -> dict[str, Any]:
    deployment = one("Deployment", "imagegen")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


# --- real settings -----------------------------------------------------------------------


@cache
def otel_variables() -> frozenset[str]:
    """Every OTEL_* variable the OpenTelemetry API and SDK define."""
    import opentelemetry.environment_variables as api_variables
    import opentelemetry.sdk.environment_variables as sdk_variables

    return frozenset(
        value
        for module in (api_variables, sdk_variables)
        for key, value in vars(module).items()
        if key.startswith("OTEL_") and isinstance(value, str)
    )


@cache
def aws_variables() -> frozenset[str]:
    """Every AWS_* variable botocore reads: credentials and session settings."""
    from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
    from botocore.credentials import EnvProvider

    names = {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY, EnvProvider.EXPIRY_TIME}
    names.update(EnvProvider.TOKENS)
    for _config_key, env_names, *_ in BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        if isinstance(env_names, str):
            names.add(env_names)
        elif env_names:
            names.update(env_names)
    return frozenset(names)


def is_real_setting(name: str) -> bool:
    """A variable the code reads: declared in config.SETTINGS, or a standard OTEL_* or
    AWS_* variable that the OpenTelemetry SDK or botocore defines."""
    declared = {s.name for s in SETTINGS if not s.name.endswith("*")}
    if name in declared:
        return True
    if name.startswith("OTEL_"):
        return name in otel_variables()
    if name.startswith("AWS_"):
        return name in aws_variables()
    return False


def test_the_setting_check_refuses_made_up_names() -> None:
    assert is_real_setting("IMAGEGEN_SHUTDOWN_GRACE")
    assert is_real_setting("AWS_SECRET_ACCESS_KEY") and is_real_setting("OTEL_SERVICE_NAME")
    for made_up in ("IMAGEGEN_SHUTDOWN_GRACE_S", "AWS_SECRET_KEY", "OTEL_NAME", "S3_BUCKET"):
        assert not is_real_setting(made_up), made_up


# --- Kubernetes: schemas ------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_and_leaves_out_the_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_EXAMPLE.name}
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    assert one("Namespace")["metadata"]["name"] == kustomization["namespace"]
    assert secret_example()["metadata"]["namespace"] == kustomization["namespace"]
    (image,) = kustomization["images"]
    assert (image["name"], image["newTag"]) == ("imagegen", project_version())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_validate_strictly_against_the_kubernetes_schemas(version: str) -> None:
    documents = [(name, doc) for name, doc in manifests() if _crd_key(doc) not in CRD_FILES]
    documents.append((SECRET_EXAMPLE.name, secret_example()))
    assert {doc["kind"] for _, doc in documents} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
        "Job",
    }
    for name, doc in documents:
        # Any warning fails too; a kind with no schema raises SchemaNotFoundError.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name} {doc['kind']}: {path}: {exc.message}")


def test_strict_validation_refuses_an_unknown_field() -> None:
    deployment = copy.deepcopy(one("Deployment", "imagegen"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _crd_key(doc: dict[str, Any]) -> tuple[str, str]:
    return (doc["apiVersion"], doc["kind"])


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """A validator for one custom resource from its vendored CRD's OpenAPI v3 schema,
    made strict as the API server's strict field validation is: objects that list their
    properties (and do not preserve unknown fields) refuse any other."""
    (crd,) = load_all(SCHEMAS / CRD_FILES[(api_version, kind)])
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    # No check_schema: it would compile every `pattern`, and some are Go regular
    # expressions (`^(?i)...`) that Python's re refuses; none of those fields is set here.
    return jsonschema.Draft202012Validator(schema)


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    if "properties" in schema:
        # Property names are data here, not keywords: restore them untouched.
        strict["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
    return strict


def test_prometheus_operator_resources_validate_against_the_vendored_crds() -> None:
    crd_documents = [doc for _, doc in manifests() if _crd_key(doc) in CRD_FILES]
    assert sorted(doc["kind"] for doc in crd_documents) == ["PrometheusRule", "ServiceMonitor"]
    for doc in crd_documents:
        errors = sorted(crd_validator(*_crd_key(doc)).iter_errors(doc), key=str)
        assert not errors, [f"{doc['kind']}: {e.json_path}: {e.message}" for e in errors]
        assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_the_strict_crd_schema_refuses_an_unknown_field() -> None:
    monitor = copy.deepcopy(one("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "30s"  # the field is `interval`
    validator = crd_validator(*_crd_key(monitor))
    assert not validator.is_valid(monitor)
    rule = copy.deepcopy(one("PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    assert not crd_validator(*_crd_key(rule)).is_valid(rule)


# --- alerts -------------------------------------------------------------------------------


def alert_rules() -> Iterator[tuple[str, dict[str, Any]]]:
    sources = {
        "deploy/alerts.yaml": yaml.safe_load((DEPLOY / "alerts.yaml").read_text())["groups"],
        "PrometheusRule": one("PrometheusRule")["spec"]["groups"],
    }
    for source, groups in sources.items():
        for group in groups:
            for rule in group["rules"]:
                yield source, rule


def test_the_prometheus_rule_holds_the_alerts_of_alerts_yaml() -> None:
    plain = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())
    assert one("PrometheusRule")["spec"]["groups"] == plain["groups"]


def test_every_alert_expression_parses_as_promql() -> None:
    rules = list(alert_rules())
    assert rules
    for source, rule in rules:
        name = rule.get("alert") or rule.get("record")
        try:
            promql_parser.parse(str(rule["expr"]))
        except ValueError as exc:
            pytest.fail(f"{source} {name}: {exc}")
        if "for" in rule:
            # A configured value, not a clock: a zero `for` would fire on one scrape.
            assert promql_parser.parse_duration(rule["for"]), f"{name} has a zero 'for'"


def test_the_promql_parser_refuses_a_broken_expression() -> None:
    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum by (provider (increase(imagegen_generations_total[10m]))")
    with pytest.raises(ValueError):
        promql_parser.parse("rate(imagegen_generations_total)")  # rate needs a range


# --- Kubernetes: what the manifests must say ---------------------------------------------


def test_every_env_var_the_manifests_set_is_a_real_setting() -> None:
    names: set[str] = set()
    for _, pod in pod_specs():
        for container in pod["containers"]:
            names.update(container_env(container))
    names.update(secret_example()["stringData"])
    unknown = sorted(n for n in names if not is_real_setting(n))
    assert not unknown, f"not settings the code reads: {unknown}"


def test_secrets_come_only_from_the_secret() -> None:
    for config_map in of_kind("ConfigMap"):
        assert not SECRET_SETTINGS & set(config_map["data"]), config_map["metadata"]["name"]
    secret_keys = set(secret_example()["stringData"])
    for where, pod in pod_specs():
        for container in pod["containers"]:
            for entry in container.get("env", []):
                assert "value" not in entry or entry["name"] not in SECRET_SETTINGS, where
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["key"] in secret_keys, f"{where}: {ref['key']} not in the Secret"
    # Every key of the Secret is read by the server.
    used = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in server_container()["env"]
        if "valueFrom" in e
    }
    assert used == secret_keys


def test_the_pods_settings_parse_and_require_external_postgres_and_s3() -> None:
    for where, pod in pod_specs():
        for container in pod["containers"]:
            settings = Settings.from_env(container_env(container))
            assert settings.database_url is not None, where
    settings = Settings.from_env(container_env(server_container()))
    assert settings.s3 is not None and settings.s3.bucket
    assert settings.jwt.key is not None
    assert settings.host == "0.0.0.0"
    assert settings.webhooks.key is not None
    # DATABASE_URL and the keys are required: no embedded database, no per-pod key.
    required = ("DATABASE_URL", "IMAGEGEN_JWT_KEY", "IMAGEGEN_WEBHOOK_KEY", "AWS_SECRET_ACCESS_KEY")
    for entry in server_container()["env"]:
        if entry["name"] in required:
            assert not entry["valueFrom"]["secretKeyRef"].get("optional", False)


def test_the_deployment_is_replicated_locked_down_and_probed() -> None:
    deployment = one("Deployment", "imagegen")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container()
    assert deployment["spec"]["replicas"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])

    # The process writes only to emptyDir volumes: the data directory and /tmp.
    settings = Settings.from_env(container_env(container))
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(settings.data_dir)] in empty_dirs and mounts["/tmp"] in empty_dirs

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": settings.grpc_port,
        "http": settings.http_port,
        "mcp": settings.mcp.port,
    }
    # Readiness follows the health state that drains: the whole server's gRPC health.
    assert container["readinessProbe"]["grpc"] == {"port": settings.grpc_port, "service": ""}
    # Liveness must hold during a drain, when gRPC health is NOT_SERVING: /healthz stays 200
    # (tests/e2e/test_health_cli.py checks both while a drain waits for a job).
    assert "grpc" not in container["livenessProbe"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_the_pod_outlives_the_drain() -> None:
    pod = one("Deployment", "imagegen")["spec"]["template"]["spec"]
    container = server_container()
    grace = Settings.from_env(container_env(container)).shutdown_grace.total_seconds()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # preStop counts against the termination grace period; keep a margin over both.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5


def test_services_budget_autoscaler_and_monitor_point_at_the_server_pods() -> None:
    deployment = one("Deployment", "imagegen")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in server_container()["ports"]}
    for service in of_kind("Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert {p["name"] for p in one("Service", "imagegen")["spec"]["ports"]} == {
        "grpc",
        "http",
        "mcp",
    }

    budget = one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    autoscaler = one("HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "imagegen",
    }
    assert autoscaler["spec"]["minReplicas"] >= 2
    assert autoscaler["spec"]["minReplicas"] <= deployment["spec"]["replicas"]

    # Exactly one Service is scraped (each pod once), on a port it has.
    monitor = one("ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = [s for s in of_kind("Service") if wanted <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["imagegen"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in scraped[0]["spec"]["ports"]
    }


def test_the_migration_job_runs_imagegen_migrate_on_the_same_image() -> None:
    job = one("Job", "imagegen-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert container["image"] == server_container()["image"] == f"imagegen:{project_version()}"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


# --- docker compose -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with NAME unset; any other form fails the test."""
    resolved = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", lambda m: m.group(1), value)
    assert "$" not in resolved, f"unsupported interpolation in {value!r}"
    return resolved


def imagegen_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith("imagegen")}


def test_the_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=str)
    assert not errors, [f"{e.json_path}: {e.message}" for e in errors]
    broken = compose()
    broken["services"]["imagegen"]["stop_grace_periods"] = "45s"
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


def test_the_compose_cluster_runs_migrations_then_two_replicas() -> None:
    services = imagegen_services()
    assert services["migrate"]["command"] == ["migrate"]
    server = services["imagegen"]
    assert server["command"] == ["serve"]
    assert server["deploy"]["replicas"] == 2
    assert server["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert {"postgres", "s3"} <= set(compose()["services"])
    for name, service in services.items():
        settings = Settings.from_env(
            {k: interpolate(str(v)) for k, v in service["environment"].items()}
        )
        assert settings.database_url is not None and settings.s3 is not None, name
    grace = Settings.from_env(
        {k: interpolate(str(v)) for k, v in server["environment"].items()}
    ).shutdown_grace.total_seconds()
    stop = re.fullmatch(r"(\d+)s", server["stop_grace_period"])
    assert stop is not None and int(stop.group(1)) >= grace + 10


def test_every_env_var_the_compose_file_sets_for_imagegen_is_a_real_setting() -> None:
    names = {name for s in imagegen_services().values() for name in s.get("environment", {})}
    assert names
    unknown = sorted(n for n in names if not is_real_setting(n))
    assert not unknown, f"not settings the code reads: {unknown}"


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def runtime_instructions() -> list[tuple[str, str]]:
    """(instruction, value) of the last stage, the one that runs."""
    instructions = [(i["instruction"], i["value"]) for i in dockerfile().structure]
    last_from = max(n for n, (name, _) in enumerate(instructions) if name == "FROM")
    return [(name, value) for name, value in instructions[last_from:] if name != "COMMENT"]


def dockerfile_uid() -> int:
    users = [value for name, value in runtime_instructions() if name == "USER"]
    assert users, "the image runs as root"
    return int(users[-1].split(":")[0])


def test_the_image_declares_health_volume_stop_signal_and_a_numeric_user() -> None:
    instructions = dict(runtime_instructions())
    assert dockerfile_uid() != 0
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert '"imagegen", "health"' in instructions["HEALTHCHECK"]
    env = dict(dockerfile().envs)
    assert json.loads(instructions["VOLUME"]) == [env["IMAGEGEN_DATA_DIR"]]


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- start-up notice ----------------------------------------------------------------------


def test_public_url_notice_when_every_interface_is_bound_without_a_public_url() -> None:
    notice = public_url_notice("0.0.0.0", None, 8088)
    assert notice is not None
    assert "IMAGEGEN_PUBLIC_URL" in notice and "http://127.0.0.1:8088" in notice
    assert public_url_notice("::", None, 8088) is not None


def test_no_public_url_notice_when_it_is_set_or_the_host_is_specific() -> None:
    assert public_url_notice("0.0.0.0", "https://images.example.test", 8088) is None
    assert public_url_notice("127.0.0.1", None, 8088) is None
    assert public_url_notice("10.1.2.3", None, 8088) is None

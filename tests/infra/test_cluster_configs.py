"""The configs that the manifests and the infra READMEs submit to a cluster suit that cluster: they wait for
an autoscaler where GPU workers can be 0, a search searches around its own recipe (not the CPU quickstart's
default space), and a lost GPU pod is retried as infra/k8s/README.md says. Each config is loaded as the job
would load it, with the command's --set overrides.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from test_manifests import INFRA, ROOT, load_documents, of_kind

from pipeline.config import Config, load_config

IMAGE_CONFIGS = "/home/ray/ccnet/configs/"  # where infra/k8s/Dockerfile puts configs/


@dataclass
class Submission:
    where: str  # the manifest or README it comes from
    job: str  # train | tune
    config_path: Path
    overrides: list[str]
    workers_can_be_0: bool  # its cluster's GPU workers scale down to none

    def config(self) -> Config:
        return load_config(self.config_path, self.overrides)


def parse_command(where: str, words: list[str], workers_can_be_0: bool) -> Submission | None:
    """A `python -m jobs.JOB` / `ccnet submit JOB` / `ccnet schedule CRON JOB` command of train or tune."""
    jobs = [w.removeprefix("jobs.") for w in words if w.removeprefix("jobs.") in ("train", "tune")]
    if not jobs or "-c" not in words:
        return None
    path = words[words.index("-c") + 1]
    in_image = path.startswith(IMAGE_CONFIGS)
    local = ROOT / "configs" / path.removeprefix(IMAGE_CONFIGS) if in_image else ROOT / path
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    return Submission(where, jobs[0], local, overrides, workers_can_be_0)


def readme_commands(path: Path) -> list[list[str]]:
    """The `ccnet submit` and `ccnet schedule` commands of a README's shell blocks, continuations joined."""
    text = path.read_text().replace("\\\n", " ")
    return [
        shlex.split(line, comments=True)
        for line in text.splitlines()
        if re.match(r"\s*ccnet (submit|schedule)\b", line)
    ]


def cluster_submissions() -> list[Submission]:
    found = []
    for name, doc in of_kind("RayJob"):
        groups = doc["spec"].get("rayClusterSpec", {}).get("workerGroupSpecs", [])
        # a RayJob without its own cluster selects the long-running RayCluster, autoscaled from 0
        can_be_0 = any(g["minReplicas"] == 0 for g in groups) or "clusterSelector" in doc["spec"]
        submission = parse_command(name, shlex.split(doc["spec"]["entrypoint"]), can_be_0)
        if submission:
            found.append(submission)
    (aws,) = load_documents(INFRA / "aws" / "cluster.yaml")
    aws_can_be_0 = any(
        t.get("min_workers", 0) == 0
        for name, t in aws["available_node_types"].items()
        if name != aws["head_node_type"]
    )
    ((_, raycluster),) = of_kind("RayCluster")
    k8s_can_be_0 = any(g["minReplicas"] == 0 for g in raycluster["spec"]["workerGroupSpecs"])
    for readme, can_be_0 in (
        (INFRA / "aws" / "README.md", aws_can_be_0),
        (INFRA / "k8s" / "README.md", k8s_can_be_0),
    ):
        for words in readme_commands(readme):
            submission = parse_command(readme.relative_to(ROOT).as_posix(), words, can_be_0)
            if submission:
                found.append(submission)
    return found


def max_failures_claim() -> int:
    """The retries infra/k8s/README.md promises the GPU recipes."""
    readme = (INFRA / "k8s" / "README.md").read_text()
    match = re.search(r"FailureConfig\(max_failures\)` \((\d+) in the GPU recipes", readme)
    assert match, "infra/k8s/README.md no longer states run.max_failures of the GPU recipes"
    return int(match.group(1))


def crop_space_problems(config_path: Path, config: Config) -> list[str]:
    """A search whose space is not its config's own: no `tune:` section in the file (the CPU quickstart's
    default space applies), crop sizes away from the recipe's data.crop_size, or an ASHA grace period that
    stops trials before their first val mIoU (or never)."""
    section = (yaml.safe_load(config_path.read_text()) or {}).get("tune") or {}
    if "space" not in section:
        return [f"{config_path.name}: no tune.space, so the default space (crops 160/192) is searched"]
    crops = config.tune.space.get("data.crop_size", {}).get("choice", [config.data.crop_size])
    problems = [
        f"crop {crop} is not within 25 % of data.crop_size={config.data.crop_size}"
        for crop in crops
        if abs(crop - config.data.crop_size) > 0.25 * config.data.crop_size
    ]
    if config.data.crop_size not in crops:
        problems.append(f"the recipe's own crop {config.data.crop_size} is not searched")
    if not config.train.eval_every <= config.tune.grace_period < config.train.iterations:
        problems.append(
            f"tune.grace_period={config.tune.grace_period} is not between the first val mIoU "
            f"(train.eval_every={config.train.eval_every}) and the end "
            f"(train.iterations={config.train.iterations})"
        )
    return problems


# ------------------------------------------------------------------------------------- the files themselves


def test_the_submissions_are_found() -> None:
    submissions = cluster_submissions()
    expected = {
        "rayjob-train.yaml",
        "rayjob-tune.yaml",
        "cronjob-tune.yaml:rayjob.yaml",
        "infra/aws/README.md",
    }
    assert expected <= {s.where for s in submissions}
    assert {s.job for s in submissions if s.where == "infra/aws/README.md"} == {"train", "tune"}


def test_autoscaled_clusters_wait_for_their_workers() -> None:
    waiting = [s for s in cluster_submissions() if s.workers_can_be_0]
    assert waiting, "infra/aws/cluster.yaml starts without GPU nodes"
    for submission in waiting:
        # with resource_wait 0 the driver refuses the run before the autoscaler has added a node
        assert submission.config().run.resource_wait > 0, (submission.where, submission.config_path.name)


def test_searches_search_around_their_recipe() -> None:
    searches = [s for s in cluster_submissions() if s.job == "tune"]
    assert {"rayjob-tune.yaml", "cronjob-tune.yaml:rayjob.yaml"} <= {s.where for s in searches}
    for search in searches:
        assert crop_space_problems(search.config_path, search.config()) == [], search.where


def test_gpu_runs_retry_as_the_readme_says() -> None:
    claim = max_failures_claim()
    gpu_configs = [
        path for path in sorted((ROOT / "configs").glob("*.yaml")) if load_config(path, []).run.use_gpu
    ]
    assert gpu_configs
    for path in gpu_configs:
        assert load_config(path, []).run.max_failures == claim, path.name
    for submission in cluster_submissions():
        assert submission.config().run.max_failures == claim, submission.where


# ----------------------------------------------------------------------- the checkers reject bad manifests


def test_checkers_reject_bad_submissions(tmp_path: Path) -> None:
    words = shlex.split("python -m jobs.tune -c /home/ray/ccnet/configs/x.yaml --set tune.name=a --set b.c=d")
    submission = parse_command("m", words, True)
    assert submission == Submission("m", "tune", ROOT / "configs" / "x.yaml", ["tune.name=a", "b.c=d"], True)
    assert parse_command("m", shlex.split("python -m jobs.evaluate -c x.yaml"), True) is None
    readme = tmp_path / "README.md"
    readme.write_text("```bash\nccnet submit tune -c c.yaml \\\n  --set a=1  # note\nccnet jobs list\n```\n")
    assert readme_commands(readme) == [["ccnet", "submit", "tune", "-c", "c.yaml", "--set", "a=1"]]

    recipe = yaml.safe_load((ROOT / "configs" / "ccnet_r50-d8_camvid-360x360_20k.yaml").read_text())

    def problems_of(tune: dict[str, Any]) -> list[str]:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({**recipe, "tune": tune}))
        return crop_space_problems(path, load_config(path, []))

    assert problems_of(recipe["tune"]) == []
    assert problems_of({})  # the default space
    for crops in ([160, 192], [320, 400], [360, 720]):
        space = {**recipe["tune"]["space"], "data.crop_size": {"choice": crops}}
        assert problems_of({**recipe["tune"], "space": space}), crops
    for grace_period in (100, 20000):
        assert problems_of({**recipe["tune"], "grace_period": grace_period}), grace_period

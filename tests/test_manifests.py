"""Cluster manifests parse, pass the KubeRay operator's validation rules, run the image the
Dockerfile builds, and name `posdistill` commands that exist on configs that validate.

The KubeRay rules live in cluster/manifests.py with their sources (ray-project/kuberay
ray-operator/controllers/ray/utils/validation.go, ValidateRayJobSpec / ValidateRayClusterSpec;
`BackoffLimit is incompatible with ClusterSelector mode` from PR 4527, issue 4516). Each rule
is also fed a manifest that breaks it, so a checker that passes everything fails here.
"""

import copy
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import click
import pytest
import yaml

from cluster.manifests import manifest_problems, repo_config, resolve_entrypoint
from pipeline.config import load_config
from pipeline.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted((ROOT / "cluster").rglob("*.yaml"))
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
RAYJOBS = [p for p in KUBERAY if p.name.startswith("rayjob-")]


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path):
    (doc,) = _docs(path)
    return doc


def _images(node):
    """Every `image:` value anywhere in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from _images(v)
    elif isinstance(node, list):
        for v in node:
            yield from _images(v)


def _documented_image():
    m = re.search(r"^# image: (\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile has no `# image: REGISTRY/NAME:TAG` line"
    return m.group(1)


# ----------------------------------------------------------------------------- parsing, images


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_every_cluster_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path.name}: no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict)


def test_every_manifest_runs_the_dockerfile_image():
    image = _documented_image()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image.rsplit(":", 1)[1] == version, "the image tag's version is pyproject.toml's"
    seen = {p.name: set(_images(_docs(p))) for p in KUBERAY}
    assert set().union(*seen.values()) == {image}, seen
    # attach jobs name no image: their submitter defaults to the selected cluster's head image
    assert all(seen[n] for n in seen if n == "raycluster.yaml" or n.endswith("-owned.yaml")), seen
    assert image in (ROOT / "README.md").read_text()


# ----------------------------------------------------------------------------- KubeRay validation


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_pass_the_operator_rules(path):
    for doc in _docs(path):
        assert manifest_problems(doc) == [], f"{path.name}: {manifest_problems(doc)}"


def test_rayjob_variants_own_xor_attach():
    by = {p.name: _one(p) for p in RAYJOBS}
    assert set(by) == {f"rayjob-{s}-{v}.yaml" for s in ("cache", "train") for v in ("attach", "owned")}
    for name, job in by.items():
        spec = job["spec"]
        if name.endswith("-attach.yaml"):
            assert spec["clusterSelector"] == {"ray.io/cluster": _one(KUBERAY[0])["metadata"]["name"]}
            assert "rayClusterSpec" not in spec and not spec.get("backoffLimit")
        else:
            assert "clusterSelector" not in spec
            assert spec["backoffLimit"] >= 1 and spec["shutdownAfterJobFinishes"] is True


def test_owned_jobs_bring_up_the_same_cluster_as_raycluster_yaml():
    rc = _one(ROOT / "cluster" / "kuberay" / "raycluster.yaml")
    for path in RAYJOBS:
        if path.name.endswith("-owned.yaml"):
            assert _one(path)["spec"]["rayClusterSpec"] == rc["spec"], path.name


def test_cluster_pods_mount_the_shared_claim_and_use_token_auth():
    rc = _one(ROOT / "cluster" / "kuberay" / "raycluster.yaml")
    pvc = _one(ROOT / "cluster" / "kuberay" / "shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "posdistill-ray-token"}
    pods = [rc["spec"]["headGroupSpec"]["template"]["spec"]] + \
        [w["template"]["spec"] for w in rc["spec"]["workerGroupSpecs"]]
    for spec in pods:
        assert {"name": "shared", "mountPath": "/shared"} in spec["containers"][0]["volumeMounts"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["shared"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def _valid_owned():
    return _one(ROOT / "cluster" / "kuberay" / "rayjob-cache-owned.yaml")


def _valid_attach():
    return _one(ROOT / "cluster" / "kuberay" / "rayjob-cache-attach.yaml")


def _set(doc, path, value):
    node = doc
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DEL:
        del node[last]
    else:
        node[last] = value


_DEL = object()
_WG = "spec.rayClusterSpec.workerGroupSpecs.0"
# (base manifest, edits, text the problem must contain)
BREAKS = [
    ("attach", {"spec.backoffLimit": 3}, "PR 4527"),
    ("attach", {"spec.clusterSelector": {"ray.io/cluster": ""}}, "must name the cluster"),
    ("attach", {"spec.submissionMode": "SidecarMode"}, "SidecarMode"),
    ("attach", {"spec.suspend": True, "spec.shutdownAfterJobFinishes": True}, "suspend"),
    ("attach", {"spec.shutdownAfterJobFinishes": True}, "no effect on a selected cluster"),
    ("attach", {"spec.rayClusterSpec": {}}, "both set"),
    ("attach", {"spec.clusterSelector": _DEL}, "one of rayClusterSpec or clusterSelector"),
    ("attach", {"spec.submissionMode": "K8sMode"}, "is not one of"),
    ("attach", {"spec.entrypoint": " "}, "spec.entrypoint"),
    ("attach", {"metadata.name": "Posdistill_cache"}, "DNS-1035"),
    ("attach", {"metadata.name": "p" * 48}, "at most 47"),
    ("owned", {"spec.submissionMode": "InteractiveMode"}, "InteractiveMode"),
    ("owned", {"spec.backoffLimit": -1}, "non-negative"),
    ("owned", {"spec.activeDeadlineSeconds": 0}, "activeDeadlineSeconds"),
    ("owned", {"spec.suspend": True, "spec.shutdownAfterJobFinishes": False}, "needs shutdownAfterJobFinishes"),
    ("owned", {"spec.shutdownAfterJobFinishes": False}, "ttlSecondsAfterFinished"),
    ("owned", {"spec.ttlSecondsAfterFinished": -5}, "non-negative"),
    ("owned", {"spec.submissionMode": "SidecarMode", "spec.submitterPodTemplate": {"spec": {}}}, "SidecarMode"),
    ("owned", {f"{_WG}.minReplicas": _DEL}, "both minReplicas and maxReplicas"),
    ("owned", {f"{_WG}.minReplicas": 9}, "greater than maxReplicas"),
    ("owned", {f"{_WG}.maxReplicas": -1}, "negative"),
    ("owned", {f"{_WG}.replicas": 9}, "outside [minReplicas, maxReplicas]"),
    ("owned", {f"{_WG}.template.spec.containers": []}, "at least one container"),
    ("owned", {"spec.rayClusterSpec.headGroupSpec.template.spec.containers": []}, "at least one container"),
    ("owned", {"spec.rayClusterSpec.rayVersion": "2.40.0"}, "2.52.0"),
    ("owned", {"spec.rayClusterSpec.rayVersion": _DEL}, "rayVersion: required"),
    ("owned", {"spec.rayClusterSpec.authOptions": {"mode": "token", "enableK8sTokenAuth": True}}, "K8s token auth"),
    ("owned", {f"{_WG}.template.spec.containers.0.image": ""}, "no image"),
    ("owned", {f"{_WG}.template.spec.containers.0.name": "Ray_Worker"}, "DNS-1123"),
    ("owned", {f"{_WG}.template.spec.containers.0.resources.limits": {"cpu": "64"}}, "limits.memory"),
    ("owned", {f"{_WG}.template.spec.containers.0.resources.requests.cpu": "32"}, "requests.cpu != limits.cpu"),
]


@pytest.mark.parametrize("base,edits,expect", BREAKS, ids=[b[2] + "-" + ",".join(b[1]) for b in BREAKS])
def test_each_rule_rejects_a_manifest_that_breaks_it(base, edits, expect):
    doc = copy.deepcopy(_valid_attach() if base == "attach" else _valid_owned())
    for path, value in edits.items():
        _set(doc, path, value)
    problems = manifest_problems(doc)
    assert any(expect in p for p in problems), problems


# ----------------------------------------------------------------------------- entrypoints


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoints_are_real_commands_on_valid_configs(path):
    job = _one(path)
    command, params = resolve_entrypoint(job["spec"]["entrypoint"])
    stage = path.name.split("-")[1]
    assert command == {"cache": "posdistill cache run", "train": "posdistill train"}[stage]
    assert params.get("resume") in (None, False), "a fresh run has no checkpoint: --resume would fail it"
    cfg = load_config(repo_config(params["config"], ROOT))
    if stage == "train":  # the cluster has a GPU per training rank
        rc = job["spec"].get("rayClusterSpec") or _one(ROOT / "cluster" / "kuberay" / "raycluster.yaml")["spec"]
        gpus = sum(int(w["replicas"]) * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]
                                            .get("nvidia.com/gpu", 0)) for w in rc["workerGroupSpecs"])
        assert cfg.train.workers and gpus >= cfg.train.workers, (gpus, cfg.train.workers)


@pytest.mark.parametrize("entrypoint", ["posdistill trian /shared/configs/demo.yaml",
                                        "posdistill train /shared/configs/demo.yaml --resum",
                                        "posdistill cache run /shared/configs/demo.yaml --phase x",
                                        "posdistill analyze"])
def test_entrypoint_parser_rejects_what_the_cli_rejects(entrypoint):
    with pytest.raises(click.UsageError):
        resolve_entrypoint(entrypoint)


def test_entrypoint_must_be_posdistill_and_config_must_be_in_the_repo():
    with pytest.raises(ValueError):
        resolve_entrypoint("python train.py")
    with pytest.raises(ValueError):
        repo_config("/data/configs/x.yaml", ROOT)
    assert repo_config("/shared/configs/demo.yaml", ROOT) == ROOT / "configs" / "demo.yaml"


# ----------------------------------------------------------------------------- Dockerfile


def _dockerfile():
    """Instructions, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerfile_pins_torch_before_the_package_and_runs_unprivileged():
    lines = _dockerfile()
    ops = [ln.split()[0].upper() for ln in lines]
    assert lines[0].startswith("ARG BASE=") and lines[1] == "FROM ${BASE}"
    assert "ENTRYPOINT" not in ops and "CMD" not in ops  # KubeRay gives the `ray start` command
    torch = next(i for i, ln in enumerate(lines) if "pip install" in ln and "TORCH_SPEC" in ln)
    package = next(i for i, ln in enumerate(lines) if re.search(r'pip install (\.|"\.\[\$\{EXTRAS\}\]")( |$)', ln))
    assert torch < package
    assert any(ln.startswith("ARG TORCH_SPEC=torch==") for ln in lines[:torch])
    assert any(ln.startswith("ARG TORCH_INDEX_URL=") for ln in lines[:torch])
    assert "--index-url" in lines[torch]
    users = [ln for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split()[1] not in ("root", "0")


def test_dockerfile_copies_only_allow_listed_paths_and_dockerignore_denies_the_rest():
    allowed = {"pyproject.toml", "README.md", "pipeline/", "stages/", "cluster/", "configs/"}
    for ln in _dockerfile():
        if ln.upper().startswith(("COPY", "ADD")):
            assert ln.split()[0].upper() == "COPY", ln
            srcs = set(shlex.split(ln)[1:-1])
            assert srcs and srcs <= allowed, ln
            for src in srcs:
                assert (ROOT / src).exists(), src
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "deny by default"
    assert {r[1:] for r in rules if r.startswith("!")} == allowed
    assert "**/.*" in rules and "**/*.parquet" in rules  # dotfiles (tokens, .git, .env) and data


# ----------------------------------------------------------------------------- ray up


def test_ray_up_cluster_yaml():
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands",
                "worker_start_ray_commands", "file_mounts"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any("/shared" in c for c in cfg["setup_commands"])
    # the code arrives as the wheel that the header's documented step builds into ./dist
    remote = next(r for r, local in cfg["file_mounts"].items() if local == "./dist")
    install = next(c for c in cfg["setup_commands"] if "posdistill" in c)
    assert install.index("torch==") < install.index(f"{remote}/posdistill-")
    assert "pip wheel --no-deps -w dist ." in (ROOT / "cluster" / "ray-cluster.yaml").read_text()


def test_the_documented_wheel_holds_the_whole_package(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("posdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("pipeline/cli.py", "stages/train/loop.py", "stages/cache/stage.py", "cluster/jobs.py",
                   "cluster/manifests.py"):
        assert module in names, module
    assert any(n.endswith("entry_points.txt") for n in names)


def test_plan_real_scale_config():
    cfg = load_config(ROOT / "configs" / "llama-8b-to-1b.yaml")
    plan = make_plan(cfg, str(ROOT / "configs/models/llama-3.1-8b.json"), str(ROOT / "configs/models/llama-3.2-1b.json"))
    assert 7.9 < plan["teacher_params_b"] < 8.1 and 1.2 < plan["student_params_b"] < 1.3
    long = plan["phases"][-1]["memory_per_gpu"]
    # ZeRO-3 shards everything: less per GPU than ZeRO-2, which is less than ZeRO-1.
    assert long["zero3"]["total_gb"] < long["zero2"]["total_gb"] < long["zero1"]["total_gb"]
    assert plan["cache_bytes_gb"]["plain"] > plan["cache_bytes_gb"]["compact"] > 0
    assert plan["teacher_gpu_hours"] > 0


def test_plan_cli_without_teacher_config_is_clear(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", str(ROOT / "configs" / "llama-8b-to-1b.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "teacher.model" in out.stderr


def test_plan_counts_parameters_like_the_model_with_wide_heads():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.plan import Arch

    cfg = LlamaConfig(vocab_size=260, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, intermediate_size=256)  # head_dim != hidden / heads
    model = LlamaForCausalLM(cfg)
    assert Arch.from_hf(cfg.to_dict()).params == sum(p.numel() for p in model.parameters())

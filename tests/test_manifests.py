"""Cluster manifests parse, carry what a real cluster needs, and name commands that exist."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _env(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


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


def test_kuberay_cluster():
    docs = {d["kind"]: d for d in _docs(ROOT / "cluster" / "kuberay" / "raycluster.yaml")}
    rc = docs["RayCluster"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    workers = rc["spec"]["workerGroupSpecs"]
    assert any(int(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
               for w in workers)
    for spec in [head] + [w["template"]["spec"] for w in workers]:
        c = spec["containers"][0]
        assert _env(c)["RAY_AUTH_MODE"] == "token"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/shared" in mounts
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["shared"]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
        assert "secret" in vols["ray-auth"]
    assert "ReadWriteMany" in docs["PersistentVolumeClaim"]["spec"]["accessModes"]


@pytest.mark.parametrize("path", [p for p in KUBERAY if p.name.startswith("rayjob")], ids=lambda p: p.name)
def test_rayjobs_name_real_commands(path):
    (job,) = _docs(path)
    assert job["kind"] == "RayJob"
    assert job["spec"]["backoffLimit"] >= 1  # retries rely on resumable stages
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == "posdistill"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "posdistill"
    stage = argv[1]
    flags = [a for a in argv[2:] if a.startswith("--")]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for flag in flags:
        assert flag in out.stdout, f"{path.name}: `posdistill {stage}` has no {flag}"
    # the config they name exists in the repo under configs/ (copied to /shared/configs)
    cfg_name = Path(argv[2]).name
    load_config(ROOT / "configs" / cfg_name)


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

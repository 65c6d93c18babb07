"""Static checks for the KubeRay manifests under ``cluster/kuberay/``.

No Kubernetes API server or KubeRay operator runs here, so the rules the operator applies
when a RayJob or RayCluster is created are encoded by hand and checked in the tests. Each
rule cites where it comes from:

- ``kuberay``: ray-project/kuberay ``ray-operator/controllers/ray/utils/validation.go``
  (``ValidateRayJobSpec``, ``ValidateRayJobMetadata``, ``ValidateRayClusterSpec``,
  ``ValidateRayClusterMetadata``) and the CRD enums in ``ray-operator/apis/ray/v1/``, read at
  commit feeaf72 (Aug 2026). ``BackoffLimit is incompatible with ClusterSelector mode`` came
  with PR 4527 (issue 4516): a retry deletes and recreates the cluster, which a selected,
  shared cluster must not suffer.
- ``posdistill``: rules of this project, stricter than the operator, each with its reason.

A manifest that the operator would refuse fails ``kubectl apply``; one that breaks a
posdistill rule would be accepted but behave other than its comments say.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")  # CRD enum; default K8sJobMode
CLUSTER_KEY = "ray.io/cluster"  # utils.RayJobClusterSelectorKey
MAX_RAYCLUSTER_NAME = 53  # utils.MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # utils.MaxRayJobNameLength
MIN_TOKEN_AUTH_RAY = (2, 52, 0)  # authOptions.mode token needs Ray >= 2.52.0
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _name_problems(kind: str, meta: dict, limit: int) -> list[str]:
    name = str((meta or {}).get("name", ""))
    out = []
    if len(name) > limit:
        out.append(f"metadata.name: a {kind} name has at most {limit} characters (kuberay)")
    if len(name) > 63 or not _DNS1035.match(name):
        out.append(f"metadata.name: '{name}' is not a DNS-1035 label (kuberay)")
    return out


def _version(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _pod_problems(where: str, pod: dict) -> list[str]:
    """posdistill: the first container is the Ray container (KubeRay's RayContainerIndex 0); it
    needs an image, unique DNS-1123 names and cpu/memory requests equal to limits, so Ray's
    resource view matches what Kubernetes reserves."""
    containers = ((pod or {}).get("spec") or {}).get("containers") or []
    if not containers:
        return [f"{where}: should have at least one container (kuberay)"]
    out = []
    names = [c.get("name", "") for c in containers]
    if len(set(names)) != len(names):
        out.append(f"{where}: container names repeat: {names} (posdistill)")
    for c in containers:
        name = c.get("name", "")
        if not _DNS1123.match(name):
            out.append(f"{where}: container name '{name}' is not a DNS-1123 label (posdistill)")
        if not c.get("image"):
            out.append(f"{where}.{name}: no image (posdistill)")
    res = containers[0].get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for key in ("cpu", "memory"):
        if key not in lim:
            out.append(f"{where}.{names[0]}: resources.limits.{key} is missing (posdistill)")
        elif key in req and str(req[key]) != str(lim[key]):
            out.append(f"{where}.{names[0]}: resources.requests.{key} != limits.{key} (posdistill)")
    return out


def raycluster_spec_problems(spec: dict, where: str = "spec") -> list[str]:
    """``ValidateRayClusterSpec``'s rules that a static manifest can break, plus posdistill's."""
    spec = spec or {}
    out = _pod_problems(f"{where}.headGroupSpec.template", (spec.get("headGroupSpec") or {}).get("template"))
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        w = f"{where}.workerGroupSpecs[{i}]"
        out += _pod_problems(f"{w}.template", group.get("template"))
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            out.append(f"{w}: must set both minReplicas and maxReplicas when autoscaling is disabled (kuberay)")
        if lo is not None and lo < 0 or hi is not None and hi < 0:
            out.append(f"{w}: negative minReplicas/maxReplicas (kuberay)")
        if lo is not None and hi is not None and lo > hi:
            out.append(f"{w}: minReplicas {lo} greater than maxReplicas {hi} (kuberay)")
        if n is not None and lo is not None and hi is not None and not lo <= n <= hi:
            out.append(f"{w}: replicas {n} outside [minReplicas, maxReplicas] (posdistill)")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        v = _version(spec.get("rayVersion", ""))
        if v is None:
            out.append(f"{where}.rayVersion: required with authOptions.mode token (kuberay)")
        elif v < MIN_TOKEN_AUTH_RAY:
            out.append(f"{where}.rayVersion: token auth needs Ray >= 2.52.0 (kuberay)")
    if auth.get("enableK8sTokenAuth") and auth.get("secretName"):
        out.append(f"{where}.authOptions: enableK8sTokenAuth and secretName are exclusive (kuberay)")
    return out


def rayjob_problems(job: dict) -> list[str]:
    """``ValidateRayJobSpec`` / ``ValidateRayJobMetadata`` plus posdistill's rules."""
    out = _name_problems("RayJob", job.get("metadata"), MAX_RAYJOB_NAME)
    spec = job.get("spec") or {}
    selector = spec.get("clusterSelector") or {}
    owned = spec.get("rayClusterSpec")
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if mode not in SUBMISSION_MODES:
        out.append(f"spec.submissionMode: '{mode}' is not one of {', '.join(SUBMISSION_MODES)} (kuberay)")
    if spec.get("suspend") and not shutdown:
        out.append("spec.suspend: needs shutdownAfterJobFinishes (kuberay)")
    if ttl < 0:
        out.append("spec.ttlSecondsAfterFinished: must be non-negative (kuberay)")
    if not shutdown and ttl > 0:
        out.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes (kuberay)")
    if owned is None and not selector:
        out.append("spec: one of rayClusterSpec or clusterSelector must be set (kuberay)")
    if selector:
        if not selector.get(CLUSTER_KEY):
            out.append(f"spec.clusterSelector: '{CLUSTER_KEY}' must name the cluster (kuberay)")
        if spec.get("suspend"):
            out.append("spec.suspend: not supported with clusterSelector (kuberay)")
        if mode == "SidecarMode":
            out.append("spec.clusterSelector: not supported in SidecarMode (kuberay)")
        if backoff is not None and backoff > 0:
            out.append("spec.backoffLimit: incompatible with clusterSelector; a retry deletes and recreates "
                       "the cluster (kuberay PR 4527, issue 4516)")
        if owned is not None:
            out.append("spec: clusterSelector and rayClusterSpec both set; the operator ignores rayClusterSpec "
                       "(posdistill)")
        if shutdown:
            out.append("spec.shutdownAfterJobFinishes: has no effect on a selected cluster (posdistill)")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        out.append("spec.backoffLimit: incompatible with InteractiveMode (kuberay issue 3525)")
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        out.append("spec: SidecarMode supports neither submitterPodTemplate nor submitterConfig (kuberay)")
    if backoff is not None and backoff < 0:
        out.append("spec.backoffLimit: must be non-negative (kuberay)")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and deadline <= 0:
        out.append("spec.activeDeadlineSeconds: must be positive (kuberay)")
    if mode != "InteractiveMode" and not str(spec.get("entrypoint", "")).strip():
        out.append("spec.entrypoint: empty; the job would run nothing (posdistill)")
    if owned is not None:
        if (owned.get("authOptions") or {}).get("enableK8sTokenAuth"):
            out.append("spec.rayClusterSpec.authOptions: K8s token auth is not supported for RayJob (kuberay)")
        out += raycluster_spec_problems(owned, "spec.rayClusterSpec")
    return out


def manifest_problems(doc: dict) -> list[str]:
    """Every problem in one YAML document (kinds other than RayJob / RayCluster pass)."""
    kind = doc.get("kind")
    if kind == "RayJob":
        return rayjob_problems(doc)
    if kind == "RayCluster":
        return _name_problems("RayCluster", doc.get("metadata"), MAX_RAYCLUSTER_NAME) + \
            raycluster_spec_problems(doc.get("spec"))
    return []


def resolve_entrypoint(entrypoint: str) -> tuple[str, dict[str, Any]]:
    """Parse a shell entrypoint ``posdistill SUB ... ARGS`` with the real click CLI, without
    running it; returns the full command path (e.g. ``posdistill cache run``) and its params.

    Raises ``click.UsageError`` for an unknown command or option and ``ValueError`` for an
    entrypoint that is not a ``posdistill`` command."""
    from pipeline.cli import cli

    argv = shlex.split(entrypoint)
    if not argv or argv[0] != "posdistill":
        raise ValueError(f"entrypoint '{entrypoint}' does not start with 'posdistill'")
    ctx = cli.make_context("posdistill", argv[1:])
    cmd: click.Command = cli
    while isinstance(cmd, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            raise click.UsageError(f"'{ctx.command_path}' needs a subcommand", ctx)
        name, sub, args = cmd.resolve_command(ctx, rest)
        ctx = sub.make_context(name, args, parent=ctx)
        cmd = sub
    return ctx.command_path, dict(ctx.params)


def repo_config(path: str, root: Path, mount: str = "/shared/configs") -> Path:
    """Map a config path inside the cluster (``/shared/configs/X.yaml``, copied there from this
    repo's ``configs/``) back to the repo file."""
    p = Path(path)
    if not str(p).startswith(mount + "/"):
        raise ValueError(f"config '{path}' is not under {mount}/, where the docs copy configs/")
    return root / "configs" / p.relative_to(mount)

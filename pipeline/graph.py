"""The run graph: every command runs it up to its stage's nodes.

Nodes are pack (one per distinct pack spec), teacher (only when it is bootstrapped), cache
(one per distinct KD-phase pack), train (one per student x seed, after its ``init_from``
parent), eval, analyze (perturbation per model, query spans per extended student) and the
report. Edges are paths: a node's output directory is what its dependents read.

"Done" has one rule, here: a node is done when its output directory holds ``_done.json``
naming the node's identity (written last, after the stage returned) and, for caches, its
shards still check out. Everything else is recomputed, and this module alone prints
"reusing ..." / "computing ...".
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.atomic import atomic_write_json
from pipeline.config import Config
from pipeline.errors import UserError, storage_error
from pipeline.fingerprint import dir_identity, fingerprint
from pipeline.locate import content_identity, is_remote
from pipeline.storage import Syncer, remote_for
from pipeline.resolve import (Layout, analyze_spec, bootstrap_dir, bootstrap_spec, cache_spec, eval_spec, layout, pack_spec, query_span_windows,
                              train_specs, with_teacher)
from stages.specs import CacheSpec, PackSpec, TrainSpec

DONE_FILE = "_done.json"
_WHY_NONE = {  # what a config needs for a stage to have nodes
    "train": " (it needs student: and train.phases, or students:)",
    "cache": " (teacher.model is not set, or no phase of train.phases distils: kd.alpha > 0)",
    "eval": " (eval needs teacher.model and at least one student: train.phases or students:)",
    "analyze": " (analyze needs teacher.model and at least one student: train.phases or students:)",
}
STAGES = ("pack", "teacher", "cache", "train", "eval", "analyze", "report")
FOLLOWER_WAIT_S = 6 * 3600.0  # how long a node other than node 0 waits for node 0's inputs


@dataclass(eq=False)
class Node:
    stage: str
    name: str  # how logs name it: "pack 1a2b3c4d", "train kd-theta-s0"
    locate: Callable[[], Path]  # output directory; called once the dependencies are done
    identity: Callable[[], dict[str, Any]]  # what the completion marker records
    compute: Callable[[Path], Any]
    deps: list["Node"] = field(default_factory=list)
    # Extra check of a marked output (caches re-check their shards); a reason means not done.
    problem: Callable[[Path], str | None] = lambda out: None
    # Cheap checks of the node's inputs that need no upstream output: all run before any node
    # computes, so a bad teacher or k fails in seconds, not after the packing.
    check: Callable[[], Any] | None = None
    always: bool = False  # the report: a summary of this invocation, never reused
    students: set[str] = field(default_factory=set)  # variants (and labels) this node serves
    phases: set[int] = field(default_factory=set)  # phase indices (cache and pack nodes)
    out: Path | None = None  # set once done
    _ident: str | None = field(default=None, repr=False)

    def ident(self) -> str:
        """What the completion marker records: the node's own identity and the identities of
        every node it reads, so a changed input anywhere upstream (a corpus, a teacher weight,
        a parent student) makes every node downstream of it not done."""
        if self._ident is None:
            own = self.identity()
            self._ident = fingerprint({"node": own, "inputs": sorted(d.ident() for d in self.deps)}
                                      if self.deps else own)
        return self._ident


def is_done(node: Node, out: Path, ident: str) -> bool:
    marker = out / DONE_FILE
    if node.always or not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()).get("identity") != ident:
            return False
    except (OSError, json.JSONDecodeError):
        return False
    return node.problem(out) is None


def mark_done(node: Node, out: Path, ident: str) -> None:
    atomic_write_json(out / DONE_FILE, {"stage": node.stage, "node": node.name, "identity": ident,
                                        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})


@dataclass
class RunLog:
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, list[str]] = field(default_factory=dict)
    computed: dict[str, list[str]] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - t0, 1)

    def note(self, node: Node, out: Path, reused: bool) -> None:
        (self.reused if reused else self.computed).setdefault(node.stage, []).append(node.name)
        print(f"{node.stage}: {'reusing' if reused else 'computed'} {node.name} ({out})", flush=True)


@dataclass
class Graph:
    cfg: Config
    layout: Layout
    nodes: list[Node]  # topological order
    students: list[TrainSpec]
    # Another node (multi-node training, node rank > 0) computes every node but train: wait
    # until it has, and leave the train node's marker to it.
    follower: bool = False

    def select(self, stage: str, student: str | None = None, phase: int | None = None) -> list[Node]:
        """The nodes of ``stage`` (filtered by student variant or label, and phase) and
        everything they depend on, in run order."""
        if stage not in STAGES:
            raise UserError(f"stage '{stage}': not one of {', '.join(STAGES)}")
        if student is not None and not any(student in (s.variant, s.label) for s in self.students):
            known = sorted({s.variant for s in self.students})
            raise UserError(f"--student {student}: no such student (known: {', '.join(known) or 'none'})")
        targets = [n for n in self.nodes if n.stage == stage
                   and (student is None or not n.students or student in n.students)
                   and (phase is None or phase in n.phases)]
        if not targets:
            what = f"{stage} nodes" + (f" for --student {student}" if student else "") + (
                f" for --phase {phase}" if phase is not None else "")
            raise UserError(f"this config has no {what}{_WHY_NONE.get(stage, '')}")
        keep: set[int] = set()

        def visit(n: Node) -> None:
            if id(n) in keep:
                return
            keep.add(id(n))
            for d in n.deps:
                visit(d)

        for t in targets:
            visit(t)
        return [n for n in self.nodes if id(n) in keep]

    def run(self, nodes: list[Node], log: RunLog | None = None) -> RunLog:
        log = log or RunLog()
        for node in nodes:
            if node.check is not None:
                node.check()
        for node in nodes:
            with log.stage(node.stage):
                out = node.locate()
                remote = remote_for(out)  # a bucket-backed output: its scratch mirror is pulled first
                if remote is not None:
                    remote.pull()
                ident = node.ident()
                if self.follower and node.stage != "train":
                    self._await(node, out, ident, remote)
                if is_done(node, out, ident):
                    node.out = out
                    log.note(node, out, reused=True)
                    continue
                print(f"{node.stage}: computing {node.name}", flush=True)
                try:
                    with Syncer(remote) if remote is not None else nullcontext():
                        node.compute(out)
                except OSError as err:  # disk full, read-only: one line naming the output
                    user = storage_error(err, where=out)
                    if user is None:
                        raise
                    raise user from None
                finally:
                    if remote is not None and sys.exc_info()[0] is not None:
                        with suppress(Exception):  # keep what finished for the next run to resume from
                            remote.push(final=False)
                if self.follower:  # node 0 marks it once every node's ranks are done
                    node.out = out
                    log.note(node, out, reused=False)
                    continue
                mark_done(node, out, ident)
                if remote is not None:
                    remote.push(final=True)  # completion files last
                node.out = out
                log.note(node, out if remote is None else remote.uri, reused=False)
        return log

    @staticmethod
    def _await(node: Node, out: Path, ident: str, remote: Any, timeout: float = FOLLOWER_WAIT_S) -> None:
        """Wait until node 0 has computed ``node``."""
        deadline, said = time.monotonic() + timeout, False
        while not is_done(node, out, ident):
            if time.monotonic() > deadline:
                raise UserError(f"--node-rank: waited {timeout:.0f} s for node 0 to compute {node.name} ({out}); "
                                "is `posdistill train ... --node-rank 0` running?")
            if not said:
                print(f"{node.stage}: waiting for node 0 to compute {node.name}", flush=True)
                said = True
            time.sleep(2.0)
            if remote is not None:
                remote.pull()


# ----------------------------------------------------------------------------- building


def _teacher_node(cfg: Config) -> tuple[Config, Node | None]:
    """A bootstrapped teacher is a node; a teacher directory given in the config is an input."""
    model = cfg.teacher.model
    if model and (Path(model) / "config.json").is_file():
        return cfg, None
    if model and cfg.teacher.bootstrap is None and is_remote(model):
        return cfg, None  # a Hub id (or object-store URI): fetched where it is used
    if cfg.teacher.bootstrap is None:
        if model is None:
            return cfg, None
        raise UserError(f"teacher.model: '{model}' is not a model directory and teacher.bootstrap is not set")
    from stages.bootstrap import run_bootstrap

    path, spec = bootstrap_dir(cfg), bootstrap_spec(cfg)
    node = Node("teacher", f"bootstrap {path}", locate=lambda: path, identity=spec.identity,
                compute=lambda out: run_bootstrap(spec, out, progress=False))
    return with_teacher(cfg, str(path)), node


def build_graph(cfg: Config, address: str | None = None, workers: int | None = None,
                force_cache: bool = False, rdzv: Any = None) -> Graph:
    """Resolve ``cfg`` into its nodes. ``address``: the Ray cluster for cache shards (and Ray
    Train); ``workers``: training ranks per node (default ``train.workers``); ``rdzv``: the
    nodes of a multi-node torchrun run (``cluster.launch.Rendezvous``; default one node). On
    a node other than node 0 the graph computes no input: it waits for node 0's."""
    from cluster.executor import make_cache_executor
    from cluster.launch import Rendezvous, run_training
    from cluster.local import resolve_address
    from stages.cache.stage import check_inputs, run_cache
    from stages.cache.verify import verify_cache
    from stages.pack import run_pack
    from stages.train.plan import check_train, default_workers

    rdzv = rdzv or Rendezvous()
    world = lambda spec: (workers or spec.train.workers or default_workers()) * rdzv.nnodes  # noqa: E731
    cfg, teacher = _teacher_node(cfg)
    ray_address = resolve_address(address, cfg.cluster.address)
    lay = layout(cfg)
    nodes: list[Node] = [teacher] if teacher else []
    teacher_deps = [teacher] if teacher else []
    packs: dict[str, Node] = {}
    caches: dict[str, Node] = {}

    def pack_node(spec: PackSpec) -> Node:
        key = spec.fingerprint()
        if key not in packs:
            path = lay.pack_dir(spec)
            packs[key] = Node("pack", f"pack {key[:8]} (window {spec.pack.window_len})", locate=lambda: path,
                              identity=spec.identity, compute=lambda out: run_pack(spec, out))
            nodes.append(packs[key])
        return packs[key]

    def cache_node(spec: CacheSpec) -> Node:
        key = fingerprint(spec.pack.identity())  # teacher files are hashed only when the node runs
        if key not in caches:
            pack = pack_node(spec.pack)
            ident = _memo(spec.identity)

            def compute(out: Path) -> None:
                run_cache(spec, pack.out, out, make_cache_executor(spec.teacher, spec.cache, ray_address),
                          force=force_cache)

            caches[key] = Node("cache", f"cache of pack {pack.name.split()[1]} (window {spec.pack.pack.window_len})",
                               locate=lambda: lay.cache_root / fingerprint(ident()), identity=ident,
                               compute=compute, deps=[pack, *teacher_deps],
                               check=None if teacher_deps else lambda: check_inputs(spec),
                               problem=lambda out: "; ".join(f"{n}: {r}" for n, r in verify_cache(out, trust_verified=True)) or None)
            nodes.append(caches[key])
        return caches[key]

    pack_node(pack_spec(cfg))
    students = train_specs(cfg)
    if not students and cfg.teacher.model:  # a cache-only config: the teacher over the top-level pack
        cache_node(cache_spec(cfg, pack_spec(cfg)))
    trained: dict[str, Node] = {}
    for spec in students:
        deps: list[Node] = []
        inputs: dict[int, Node] = {}
        for ph in spec.phases:
            n = cache_node(ph.cache) if ph.cache is not None else pack_node(ph.pack)
            n.students |= {spec.variant, spec.label}
            n.phases.add(ph.index)
            if ph.cache is not None:
                packs[ph.pack.fingerprint()].students |= {spec.variant, spec.label}
                packs[ph.pack.fingerprint()].phases.add(ph.index)
            inputs[ph.index] = n
            deps.append(n)
        if spec.init_from:
            deps.append(trained[spec.init_from])
        run_dir = lay.run_dir(spec)

        def compute(out: Path, spec: TrainSpec = spec, inputs: dict[int, Node] = inputs,
                    deps: list[Node] = deps) -> None:
            run_training(spec.with_inputs([d.ident() for d in deps]), {i: n.out for i, n in inputs.items()}, out,
                         workers=workers, address=ray_address, rdzv=rdzv)

        node = Node("train", f"train {spec.label}", locate=lambda d=run_dir: d, identity=spec.identity,
                    compute=compute, deps=deps, students={spec.variant, spec.label},
                    check=lambda spec=spec: check_train(spec, world(spec)))
        trained[spec.label] = node
        nodes.append(node)
    graph = Graph(cfg, lay, nodes, students, follower=rdzv.follower)
    if students and cfg.teacher.model:
        _add_eval_and_analyze(graph, list(trained.values()), teacher_deps)
    return graph


def _memo(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    box: list[dict[str, Any]] = []

    def get() -> dict[str, Any]:
        if not box:
            box.append(fn())
        return box[0]
    return get


def models_of(graph: Graph) -> dict[str, str]:
    models = {"teacher": str(graph.cfg.teacher.model)}
    for s in graph.students:
        models[s.label] = str(graph.layout.model_dir(s))
    return models


def _add_eval_and_analyze(graph: Graph, trained: list[Node], teacher_deps: list[Node]) -> None:
    from stages.analyze.perturb import run_perturb
    from stages.analyze.query_spans import run_query_spans
    from stages.analyze.query_states import run_query_states
    from stages.evaluate.run import run_eval
    from stages.pack import run_pack

    cfg, lay, nodes = graph.cfg, graph.layout, graph.nodes
    models = models_of(graph)
    ev = eval_spec(cfg)
    model_deps = [*teacher_deps, *trained]
    heldout: Node | None = None
    if ev.eval.loss_windows > 0:
        hspec = ev.heldout_pack(ev.eval.loss_window_len or max(ev.eval.lengths))
        hpath = lay.pack_dir(hspec)
        heldout = next((n for n in nodes if n.stage == "pack" and n.locate() == hpath), None)
        if heldout is None:
            heldout = Node("pack", f"pack {hspec.fingerprint()[:8]} (held-out, window {hspec.pack.window_len})",
                           locate=lambda: hpath, identity=hspec.identity, compute=lambda out: run_pack(hspec, out))
            nodes.append(heldout)
    field_of = lambda n: "teacher.model" if n == "teacher" else n  # noqa: E731 - how errors name a model
    seeds = {s.label: s.seed for s in graph.students}  # fresh probes per training seed
    ident = _memo(lambda: {"eval": ev.identity(), "probe_seeds": seeds,
                           "models": {n: content_identity(p, field_of(n)) for n, p in models.items()}})
    nodes.append(Node("eval", "eval", locate=lambda: cfg.out_dir / "eval" / fingerprint(ident(), length=12),
                      identity=ident, deps=model_deps + ([heldout] if heldout else []),
                      compute=lambda out: run_eval(ev, models, out, heldout_dir=heldout.out if heldout else None,
                                                   verbose=False, seeds=seeds)))

    # Every seed gets its analyses: findings 2 and 3 are tested across seeds like finding 1.
    an = analyze_spec(cfg)
    for name in ["teacher", *[s.label for s in graph.students]]:
        def perturb_ident(name: str = name) -> dict[str, Any]:
            return {"analyze": cfg.analyze.model_dump(mode="json"), "pack": cfg.pack.model_dump(mode="json"),
                    "model": content_identity(models[name], field_of(name))}
        pid = _memo(perturb_ident)
        nodes.append(Node("analyze", f"perturb {name}",
                          locate=lambda name=name, pid=pid: cfg.out_dir / "analyze" / f"perturb-{name}" /
                          fingerprint(pid(), length=12),
                          identity=pid, deps=model_deps,
                          compute=lambda out, name=name: run_perturb(an, models[name], out, verbose=False)))
    for s in graph.students:
        if s.init_from is None:
            continue
        before, after = str(s.student.init), models[s.label]
        windows = query_span_windows(cfg, s)

        def state_ident(before: str = before, after: str = after) -> dict[str, Any]:
            return {"before": content_identity(before, "student.init"), "after": dir_identity(after),
                    "samples": cfg.analyze.query_spans.samples, "window_len": an.window_len,
                    "eval": an.eval.identity()}
        qid = _memo(state_ident)
        nodes.append(Node("analyze", f"query states {s.label}",
                          locate=lambda s=s, qid=qid: cfg.out_dir / "analyze" / f"query-states-{s.label}" /
                          fingerprint(qid(), length=12),
                          identity=qid, deps=model_deps,
                          compute=lambda out, b=before, a=after: run_query_states(
                              an, b, a, cfg.analyze.query_spans.samples, an.window_len, out)))

        def span_ident(before: str = before, after: str = after, windows: list[int] = windows) -> dict[str, Any]:
            return {"before": content_identity(before, "student.init"), "after": dir_identity(after),
                    "windows": windows, "analyze": cfg.analyze.model_dump(mode="json")}
        sid = _memo(span_ident)
        nodes.append(Node("analyze", f"query spans {s.label}",
                          locate=lambda s=s, sid=sid: cfg.out_dir / "analyze" / f"query-spans-{s.label}" /
                          fingerprint(sid(), length=12),
                          identity=sid, deps=model_deps,
                          compute=lambda out, b=before, a=after, w=windows: run_query_spans(
                              b, a, w, top=cfg.analyze.query_spans.top, out=out, verbose=False)))

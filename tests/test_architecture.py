"""The layering rules of docs/architecture.md, checked on the source: stages never import
Ray or cluster/, and no import circle exists between the project's modules (imports inside
functions count too: a lazy import still makes a circle)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "cluster")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules (and top-level external packages) that ``path`` imports anywhere."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            # the longest project module that prefixes the name, else the external top-level package
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in modules:
                    out.add(cand)
                    break
            else:
                out.add(parts[0])
    out.discard(me)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) & modules | (_imports(p, modules) - modules) for p in files}


def test_stages_import_neither_ray_nor_cluster():
    bad = {m: sorted(d for d in deps if d == "ray" or d == "cluster" or d.startswith("cluster."))
           for m, deps in _graph().items() if m.startswith("stages")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_no_import_circle():
    graph = _graph()
    project = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in project[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(project):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_checker_sees_a_planted_circle_and_a_ray_import(tmp_path, monkeypatch):
    """The two rules above must be able to fail: a planted circle and a planted Ray import."""
    global ROOT
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "stages" / "a.py").write_text("def f():\n    import ray\n    from stages import b\n")
    (tmp_path / "stages" / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = _graph()
    assert "ray" in graph["stages.a"] and "stages.b" in graph["stages.a"] and "stages.a" in graph["stages.b"]

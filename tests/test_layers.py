"""The package layers of /work/shared/DESIGN.md ("Layers (dependencies point down only)"), checked
on every `import pdserve...` in the source, module-level or inside a function (a lazy import
crosses a layer as much as a top-level one).

A layer may import what its row of the table names, and what those may import in turn (down is
down). `cli.py`, `top.py` and each package's `commands.py` (the `pdserve` subcommands cli.py
registers) are the CLI layer: they may import everything, and inject across layers (`pdserve up`
hands the planner its performance model from sim/ to launch/). `pdserve/__init__.py` is the
public Python API (`pdserve.LLM`): everything too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pdserve"

# DESIGN.md's "may import" column; metrics_summary (vLLM-layout results arithmetic, importing
# nothing of pdserve) sits with workload, the leaf that sim and bench share.
MAY_IMPORT: dict[str, set[str]] = {
    "config": set(),
    "workload": set(),
    "metrics_summary": set(),
    "sched": {"config"},
    "model": {"config"},
    "transfer": {"config"},
    "engine": {"model", "sched", "transfer", "config"},
    "serve": {"engine", "transfer", "sched", "config"},
    "launch": {"serve", "config"},
    "sim": {"sched", "workload", "metrics_summary", "config"},
    "bench": {"workload", "metrics_summary", "config"},
}
CLI = {"cli", "top", "__init__"}

# Crossings that predate this test, each named, so that no new one slips in beside them. They are
# for their owners to remove (or for DESIGN.md to allow); the reason each exists:
KNOWN = {
    ("bench/simcheck.py", "sim"),  # the simulator checked against the real cluster it benchmarks
    ("bench/simcompare.py", "sim"),
    ("bench/prefill_factors.py", "sim"),  # the profile's in-step factors measured from real runs
    ("bench/prompts.py", "model"),  # token prompts from the model's tokenizer (lazy)
    ("engine/profiler.py", "sim"),  # `pdserve profile` fits the profile it wrote, to report the fit
}


def _closure(layer: str) -> set[str]:
    out: set[str] = set()
    todo = [layer]
    while todo:
        for dep in MAY_IMPORT[todo.pop()]:
            if dep not in out:
                out.add(dep)
                todo.append(dep)
    return out


def _layer(rel: Path) -> str:
    if rel.name == "commands.py" or rel.parts[0].removesuffix(".py") in CLI:
        return "cli"
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, pdserve subpackage or module) of every absolute `pdserve.*` import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out += [(node.lineno, n.split(".")[1]) for n in names if n.startswith("pdserve.")]
    return out


def crossings(root: Path = ROOT) -> list[str]:
    """Every import that points up or sideways, as 'file:line layer -> layer'."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        layer = _layer(rel)
        if layer == "cli":
            continue
        assert layer in MAY_IMPORT, f"{rel}: a package DESIGN.md's layer table does not name"
        allowed = _closure(layer) | {layer}
        bad += [f"{rel}:{line} {layer} -> {dep}" for line, dep in _imports(path)
                if dep not in allowed and (rel.as_posix(), dep) not in KNOWN]
    return bad


def test_every_import_points_down_the_layers() -> None:
    assert crossings() == []


def test_the_known_crossings_are_still_there() -> None:
    """An exception that is gone must leave KNOWN, so it cannot hide a new crossing later."""
    for rel, dep in KNOWN:
        assert any(d == dep for _, d in _imports(ROOT / rel)), f"{rel} no longer imports {dep}: drop it from KNOWN"


def test_a_lazy_import_of_sim_from_launch_is_a_crossing(tmp_path: Path) -> None:
    """The check sees imports inside functions (as launch/serving.py once had `from
    pdserve.sim.capacity import for_cluster` inside run_cluster)."""
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "serving.py").write_text(
        "from pdserve.serve.router import ClusterBackend\n\n\n"
        "def run():\n    from pdserve.sim.capacity import for_cluster\n    return for_cluster\n")
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "commands.py").write_text("from pdserve.sim.capacity import for_cluster\n")
    assert crossings(tmp_path) == ["launch/serving.py:5 launch -> sim"]

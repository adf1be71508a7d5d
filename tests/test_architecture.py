"""The house is walked one way: spec -> cost -> plan -> schedule -> sim | runtime -> timeline ->
report, with the session, the commands and the CLI on top. A module that imports a unit further
up the chain (or a top-level one from below) fails here, naming the import, so the shared piece
moves down instead."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpipe"

# Lower units first. A unit may import any unit at or before its own place.
ORDER = ("errors", "textfile", "spec", "catalog", "cluster", "emulation", "model", "cost", "plan",
         "schedule", "lending", "sim", "timeline", "runtime", "profile", "netns", "report")
# Units that orchestrate: they may import anything, and nothing below may import them.
TOP = {"session", "session_items", "session_events", "interleave", "prefix_cache", "commands",
       "cli", "demo", "experiment", "serve", "analyze", "__init__", "__main__"}
# Allowed upward edges, each with its reason.
EXCEPTIONS = {
    ("plan", "schedule"): "the planner scores candidate plans with the exact simulator",
    ("plan", "sim"): "the planner scores candidate plans with the exact simulator",
    ("plan", "lending"): "the planner's lower bound prices lent computes as the simulator does",
}
RANK = {unit: i for i, unit in enumerate(ORDER)}
RANK["timeline"] = RANK["spec"]  # a plain data type that sim, runtime and report all read


def hpipe_imports(path: Path) -> list[str]:
    """Every ``hpipe.X...`` module a file imports, at any depth (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
    return [m for m in out if m.startswith("hpipe.")]


def backward_imports(package: Path = PACKAGE) -> list[str]:
    bad = []
    for f in sorted(package.rglob("*.py")):
        unit = f.relative_to(package).with_suffix("").parts[0]
        for mod in hpipe_imports(f):
            target = mod.split(".")[1]
            if unit in TOP or target == unit:
                continue
            if target in TOP:
                bad.append(f"{f.relative_to(package.parent)} imports {mod} (a top-level unit)")
            elif (unit, target) in EXCEPTIONS:
                continue
            elif unit in RANK and target in RANK and RANK[target] > RANK[unit]:
                bad.append(f"{f.relative_to(package.parent)} imports {mod}")
            elif unit not in RANK or target not in RANK:
                bad.append(f"{f.relative_to(package.parent)}: unit {unit!r} or {target!r} has "
                           "no place in ORDER or TOP; give it one")
    return bad


def test_no_module_imports_against_the_flow():
    assert backward_imports() == []


def test_the_check_catches_a_backward_import(tmp_path):
    """The checker itself: a cost module importing the planner (lazily, too) is reported, a
    planner importing a cost model is not, nor is the session importing anything."""
    fake = tmp_path / "hpipe"
    for unit, text in {"cost": "def f():\n    from hpipe.plan.plan import Plan\n",
                       "plan": "from hpipe.cost.base import CostModel\n",
                       "runtime": "import hpipe.session\n"}.items():
        (fake / unit).mkdir(parents=True)
        (fake / unit / "m.py").write_text(text)
    (fake / "session.py").write_text("from hpipe.runtime.m import x\n")
    assert backward_imports(fake) == [
        "hpipe/cost/m.py imports hpipe.plan.plan",
        "hpipe/runtime/m.py imports hpipe.session (a top-level unit)"]

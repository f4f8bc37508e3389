"""The package layout: no import cycle between our modules and no stage importing a later one.

Every import counts, wherever it is written: at module level, inside a function, or under
`if TYPE_CHECKING:` (a lazy or type-only import is still a dependency a reader has to follow).
Our modules are imported at module level; only a light module (one `python -m dbtools` or
the notebook imports without torch) waits to import a heavy one until a function needs it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dbtools"

# Stages from the bottom up: a package may import its own modules and those of a lower rank.
# caption and families share a rank: either may use the other (a cycle between two modules is
# still caught by the cycle test).
RANKS = {"core": 0, "dataset": 1, "caption": 2, "families": 2, "train": 3, "after": 4, "ui": 5}
TOP = 6  # cli, demo, __main__, tiny: entry points, may import any stage
TINY_MAY_NOT_IMPORT = ("train", "after", "ui")
# What a light module must not load on import (as tests/test_cli.py's import probe checks).
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "gradio")

# Training uses after-training code at save time: it samples with `generate`, logs the
# validation loss and scores with `evaluate`, and writes single files and UI LoRA files with
# `export`/`kohya` (the same code the after-training commands run on a saved folder). These
# imports are known; no other may be added, and an entry must go when its import goes (the
# test says so).
KNOWN_LATER_STAGE_IMPORTS = {
    ("dbtools.train.outputs", "dbtools.after.evaluate"): "validation loss, scores and summary at save time",
    ("dbtools.train.outputs", "dbtools.after.export"): "--save_single_file at save time",
    ("dbtools.train.outputs", "dbtools.after.generate"): "samples at save time",
    ("dbtools.train.outputs", "dbtools.after.kohya"): "the UI LoRA file at save time",
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """`dbtools.x.y` -> its file, for every module and package under `dbtools/`."""
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Our modules an `import` / `from ... import` node loads (a package's name counts as
    the package itself, `from pkg import mod` as the module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != PACKAGE:
        return []
    targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    if len(targets) < len(node.names):
        targets.append(base)
    return targets


def placed_imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import node with where it runs: "module" (on import), "function" (when called)
    or "type" (never: under `if TYPE_CHECKING:`)."""

    def walk(nodes, where: str):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, where
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(ast.iter_child_nodes(node), "function")
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.body, "type" if where == "module" else where)
                yield from walk(node.orelse, where)
            else:
                yield from walk(ast.iter_child_nodes(node), where)

    return walk(ast.iter_child_nodes(tree), "module")


def module_imports(root: Path = ROOT) -> list[tuple[str, str, int, str]]:
    """(module, imported module, line, where) for every import of our modules and of the
    heavy libraries (`HEAVY`, named by their top-level package) in every file."""
    files = module_files(root)
    known = set(files)
    found = []
    for module, path in files.items():
        for node, where in placed_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in imported(node, module, path.name == "__init__.py", known):
                if target != module and target in known:
                    found.append((module, target, node.lineno, where))
            if isinstance(node, ast.Import):
                heavy = [alias.name.split(".")[0] for alias in node.names]
            else:
                heavy = [(node.module or "").split(".")[0]] if not node.level else []
            found += [(module, name, node.lineno, where) for name in heavy if name in HEAVY]
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of its first import}, counting every import in the file."""
    graph: dict[str, dict[str, int]] = {module: {} for module in module_files(root)}
    for module, target, line, _ in module_imports(root):
        if target in graph:
            graph[module][target] = min(graph[module].get(target, line), line)
    return graph


def heavy_modules(imports: list[tuple[str, str, int, str]]) -> set[str]:
    """Our modules whose import loads a heavy library (directly or through our modules)."""
    heavy = {module for module, target, _, where in imports if where == "module" and target in HEAVY}
    while True:
        more = {module for module, target, _, where in imports if where == "module" and target in heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def lazy_import_problems(imports: list[tuple[str, str, int, str]]) -> list[str]:
    """Imports of our modules inside functions or under TYPE_CHECKING that could be at module
    level: only a light module importing a heavy one may wait until a function runs."""
    heavy = heavy_modules(imports)
    placed = {"function": "inside a function", "type": "under TYPE_CHECKING"}
    return [f"{module} (line {line}) imports {target} {placed[where]}: import it at module level"
            f" ({f'{target} is light' if target not in heavy else f'{module} is heavy anyway'})"
            for module, target, line, where in imports
            if where in placed and target.split(".")[0] == PACKAGE and (module in heavy or target not in heavy)]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Closed paths naming every module caught in a cycle: per strongly connected group of
    modules (Tarjan), the shortest cycle through each of its members, each cycle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found: dict[frozenset, list[str]] = {}
    for group in groups:
        for start in group:
            path = closed_path(graph, start, set(group))
            found.setdefault(frozenset(zip(path, path[1:])), path)
    return list(found.values())


def closed_path(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """A shortest path from `start` back to itself through `members` (a strongly connected group)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def rank(module: str) -> int | None:
    """The stage rank of a module; None for the package itself (`dbtools/__init__.py`)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return RANKS.get(parts[1], TOP)


def layer_problems(graph: dict[str, dict[str, int]], known=KNOWN_LATER_STAGE_IMPORTS) -> list[str]:
    """Imports of a later stage that are not in `known`, and entries of `known` no longer imported."""
    problems = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            low, high = rank(module), rank(target)
            if low is None or high is None:
                continue
            stage, target_stage = module.split(".")[1], target.split(".")[1]
            tiny_reaches_up = stage == "tiny" and target_stage in TINY_MAY_NOT_IMPORT
            if (high > low or tiny_reaches_up) and (module, target) not in known:
                problems.append(f"{module} (line {line}) imports {target}, a later stage")
    problems += [f"{a} no longer imports {b}: remove it from KNOWN_LATER_STAGE_IMPORTS"
                 for a, b in known if b not in graph.get(a, {})]
    return problems


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_no_import_cycle_between_our_modules():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    found = [describe(graph, cycle) for cycle in cycles(graph)]
    assert found == [], "import cycles:\n" + "\n".join(found)


def test_no_stage_imports_a_later_stage():
    problems = layer_problems(import_graph())
    assert problems == [], "\n".join(problems)


def test_our_modules_are_imported_at_module_level_unless_that_loads_torch_into_a_light_one():
    problems = lazy_import_problems(module_imports())
    assert problems == [], "\n".join(problems)


def test_lazy_and_type_only_imports_count(tmp_path):
    # The checks see imports inside functions and under TYPE_CHECKING, relative ones too.
    pkg = tmp_path / PACKAGE
    (pkg / "core").mkdir(parents=True)
    (pkg / "train").mkdir()
    for init in (pkg, pkg / "core", pkg / "train"):
        (init / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from dbtools.train import b\n")
    (pkg / "train" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n")
    (pkg / "train" / "c.py").write_text("from dbtools.core.a import f\nfrom . import b\n")
    graph = import_graph(tmp_path)
    assert graph["dbtools.core.a"] == {"dbtools.train.b": 2}
    assert graph["dbtools.train.b"] == {"dbtools.train.c": 3}
    assert graph["dbtools.train.c"] == {"dbtools.core.a": 1, "dbtools.train.b": 2}
    assert [describe(graph, c) for c in cycles(graph)] == [  # each module of the tangle named in a cycle
        "dbtools.core.a (line 2) -> dbtools.train.b (line 3) -> dbtools.train.c (line 1) -> dbtools.core.a",
        "dbtools.train.b (line 3) -> dbtools.train.c (line 2) -> dbtools.train.b"]
    assert layer_problems(graph, {}) == ["dbtools.core.a (line 2) imports dbtools.train.b, a later stage"]
    assert layer_problems(graph, {("dbtools.core.a", "dbtools.train.b"): "known"}) == []
    assert layer_problems(graph, {("dbtools.train.b", "dbtools.core.a"): "gone"}) == [
        "dbtools.core.a (line 2) imports dbtools.train.b, a later stage",
        "dbtools.train.b no longer imports dbtools.core.a: remove it from KNOWN_LATER_STAGE_IMPORTS"]


def test_only_a_light_module_may_import_a_heavy_one_inside_a_function(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "heavy.py").write_text("import torch\nfrom dbtools import light\n")
    (pkg / "light.py").write_text("def f():\n    from dbtools import heavy\n")
    (pkg / "other.py").write_text("def f():\n    from dbtools.light import f\n    from dbtools import heavy\n")
    (pkg / "late.py").write_text("from dbtools import heavy\ndef f():\n    from dbtools import light, tiny\n")
    (pkg / "tiny.py").write_text("import torch\n")
    (pkg / "typed.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from dbtools import light\n")
    imports = module_imports(tmp_path)
    assert heavy_modules(imports) == {"dbtools.heavy", "dbtools.late", "dbtools.tiny"}
    assert lazy_import_problems(imports) == [
        "dbtools.late (line 3) imports dbtools.light inside a function: import it at module level"
        " (dbtools.light is light)",
        "dbtools.late (line 3) imports dbtools.tiny inside a function: import it at module level"
        " (dbtools.late is heavy anyway)",
        "dbtools.other (line 2) imports dbtools.light inside a function: import it at module level"
        " (dbtools.light is light)",
        "dbtools.typed (line 3) imports dbtools.light under TYPE_CHECKING: import it at module level"
        " (dbtools.light is light)"]

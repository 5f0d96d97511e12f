"""The house reads top-down (issue #13): no import cycle in `ript/`, no module importing a stage's
CLI module, and no code outside `ript/envs/` (and the benchmarks' own data stages) that tests
which benchmark it has: everything asks the Benchmark interface."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from conftest import REPO

PKG = REPO / "ript"
# The data stages of one benchmark each: the Benchmark names them (`data_module`); they are its
# code, kept beside the other stages' data helpers.
BENCHMARK_DATA_STAGES = {"ript/data/metaworld_demos.py", "ript/data/libero_data.py",
                         "ript/data/language.py", "ript/data/task_embeddings.py"}
NAMES = re.compile(r"metaworld|libero|ml45", re.I)


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """ript modules imported anywhere in the file (lazy imports count: they are dependencies)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def _is_cli(path: Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text()


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}
    # a package imports its own submodules to re-export them: not a layering cycle
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_a_stage_cli():
    mods = _modules()
    clis = {m for m, p in mods.items() if _is_cli(p)}
    assert {"ript.evaluate", "ript.rl.ript", "ript.train.sft", "ript.report"} <= clis
    offenders = {m: sorted(_imports(p, clis) - {m}) for m, p in mods.items()}
    assert not {m: d for m, d in offenders.items() if d}, offenders


def _code_tokens(path: Path) -> list[tuple[int, str]]:
    """The file's names and string literals without comments and docstrings (docs may name
    benchmarks; code must not test for them)."""
    src = path.read_text()
    # docstrings, and attribute docstrings: any string that is a whole expression statement
    docstrings = {(n.value.lineno, n.value.col_offset) for n in ast.walk(ast.parse(src))
                  if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                  and isinstance(n.value.value, str)}
    keep = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.start in
                                            docstrings):
            continue
        if tok.type in (tokenize.NAME, tokenize.STRING):
            keep.append((tok.start[0], tok.string))
    return keep


def test_benchmark_names_live_in_envs_only():
    found = {}
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(REPO))
        if rel.startswith("ript/envs/") or rel in BENCHMARK_DATA_STAGES:
            continue
        hits = [(n, t) for n, t in _code_tokens(path) if NAMES.search(t)]
        if hits:
            found[rel] = hits[:5]
    assert not found, f"code outside ript/envs/ names a benchmark: {found}"


def test_the_checks_can_fail(tmp_path):
    """The token filter keeps code and drops docs (a test that cannot fail is a defect)."""
    f = tmp_path / "m.py"
    f.write_text('"""About MetaWorld."""\n# LIBERO here\nx = "metaworld"  # a test\n')
    assert [(n, t) for n, t in _code_tokens(f) if NAMES.search(t)] == [(3, '"metaworld"')]

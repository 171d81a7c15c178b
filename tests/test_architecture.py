"""The shape of the code: packages import only what lies below them in the pipeline, nothing imports another
module's private names, plan files validate without torch or kvpress, and the API is the package's namespace."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "polykv_search"
# Each package's place in the pipeline: a package may import its own rank or lower ones, never a higher one.
# Same-rank imports are allowed but must not form a cycle.
RANK = {"errors": 0, "io": 0, "hub": 0, "checkpoints": 0,
        "models": 1, "data": 1, "policies": 1, "plan": 1,
        "runtime": 2, "export": 2, "engine": 3, "calibration": 4, "optimization": 5, "evaluation": 6, "api": 7, "cli": 8}


def package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every `from polykv_search... import ...` and `import polykv_search...` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polykv_search"):
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.startswith("polykv_search")]
    return found


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> where, for imports across packages of polykv_search."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        me = package_of(path)
        for line, module, _ in imports(path):
            parts = module.split(".")
            if len(parts) < 2:
                continue  # `polykv_search` itself: its lazy namespace, resolved to a package below
            dep = parts[1]
            if dep != me:
                edges.setdefault((me, dep), []).append(f"{path.relative_to(ROOT)}:{line}")
    return edges


def test_every_package_has_a_rank():
    packages = {package_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert packages <= set(RANK), f"give {sorted(packages - set(RANK))} a place in RANK (and the architecture)"


def test_no_import_runs_up_the_pipeline():
    upward = [f"{where}: {me} -> {dep}" for (me, dep), places in package_edges().items()
              for where in places if me in RANK and dep in RANK and RANK[dep] > RANK[me]]
    assert upward == [], "imports against the pipeline order:\n" + "\n".join(upward)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for me, dep in package_edges():
        graph.setdefault(me, set()).add(dep)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in graph.get(start, ()))

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a, {b}))
    assert cycles == []


def test_only_the_cli_imports_the_cli():
    """(and `python -m polykv_search`, which runs it)"""
    outside = [f"{path.relative_to(ROOT)}:{line}" for path in PACKAGE.rglob("*.py")
               if package_of(path) not in ("cli", "__main__")
               for line, module, _ in imports(path) if module.startswith("polykv_search.cli")]
    assert outside == []


@pytest.mark.parametrize("folder", ["polykv_search", "tests", "benchmarks", "studies"])
def test_nothing_imports_a_private_name_of_another_module(folder):
    """`from polykv_search.x import _y` and imports of `_private` modules reach into internals: public API only."""
    private = []
    for path in (ROOT / folder).rglob("*.py"):
        for line, module, names in imports(path):
            hidden = [part for part in module.split(".") if part.startswith("_") and not part.startswith("__")]
            hidden += [name for name in names if name.startswith("_") and not name.startswith("__")]
            if hidden:
                private.append(f"{path.relative_to(ROOT)}:{line} {module}: {', '.join(hidden)}")
    assert private == []


def test_no_test_of_the_package_loads_a_script_by_path():
    """A test that imports a benchmark or study from its file keeps that script alive inside the package's suite;
    a benchmark a test must exercise runs as a subprocess, as a user runs it."""
    loaders = [f"{path.relative_to(ROOT)}" for path in (ROOT / "tests").rglob("*.py")
               if path.name != "test_architecture.py"
               and any(word in path.read_text() for word in ("spec_from_file_location", "runpy", "SourceFileLoader"))]
    assert loaders == []


def test_the_package_suite_does_not_collect_the_studies():
    """`make test` (`python -m pytest -q`) runs tests/ only: the studies' own tests are run by hand."""
    lines = (ROOT / "pyproject.toml").read_text().splitlines()  # no tomllib: Python 3.10 is supported
    section = lines[lines.index("[tool.pytest.ini_options]") + 1:]
    assert 'testpaths = ["tests"]' in section[:next((i for i, line in enumerate(section) if line.startswith("[")),
                                                    len(section))]


def test_an_import_inside_a_function_says_why():
    """An import inside a function hides a dependency; it is kept only where it buys start-up time (the command
    line's --help must not load torch), and then a comment in the function says so."""
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            body = "\n".join(lines[node.lineno - 1:node.end_lineno]).lower()
            if inner and "imported here" not in body and "loads torch" not in body:
                unexplained.append(f"{path.relative_to(ROOT)}:{inner[0].lineno} in {node.name}")
    assert unexplained == []


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


BLOCKED = ["torch", "kvpress", "transformers", "numpy", "scipy", "safetensors", "datasets", "optuna", "cvxpy",
           "highspy", "rich", "typer", "click", "matplotlib", "accelerate", "gguf", "pandas", "rouge_score",
           "rapidfuzz"]


def test_a_plan_file_validates_with_only_jsonschema_installed(tmp_path):
    from polykv_search.plan import PlanFile, uniform_plan
    from tests.plan.factories import llama_like

    good = PlanFile.build(llama_like(), [uniform_plan(llama_like(), policy="snapkv", budget=64)])
    good.save(tmp_path / "good.json")
    bad = json.loads(good.to_json())
    bad["plans"][0]["layers"][3]["params"] = {"window_size": "wide"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = run_python(f"""
import sys

class Absent:  # as on a machine with only jsonschema: every other dependency of polykv-search fails to import
    BLOCKED = {BLOCKED!r}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{{name}} is not installed here")

sys.meta_path.insert(0, Absent())
from polykv_search.plan import InvalidPlanError, load_plan
plan_file = load_plan({str(tmp_path / 'good.json')!r})
try:
    load_plan({str(tmp_path / 'bad.json')!r})
    print("bad accepted")
except InvalidPlanError as exc:
    print("bad refused:", exc.problems[0])
print("budgets", plan_file.budgets)
print("loaded", sorted(m for m in ("torch", "kvpress", "transformers", "numpy") if m in sys.modules))
""")
    assert result.returncode == 0, result.stderr
    assert "budgets [64]" in result.stdout
    assert "bad refused: $.plans[0].layers[3].params.window_size: 'wide' is not a valid int" in result.stdout
    assert "loaded []" in result.stdout


def test_the_api_is_the_package_namespace_whatever_was_imported_first():
    result = run_python("""
import polykv_search.calibration, polykv_search.optimization, polykv_search.evaluation  # the stage packages first
import polykv_search as p
from polykv_search import api
print(all(getattr(p, n) is getattr(api, n) for n in ("calibrate", "optimize", "evaluate", "run", "choose")))
print(callable(p.calibrate), p.OptimizeConfig().solver, p.PlanFile.__name__)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "dp", "PlanFile"]


def test_the_command_line_starts_without_the_library():
    """`polykv-search --help` and `validate` answer in a fraction of a second: torch loads only for real work."""
    result = run_python("""
import sys
from polykv_search.cli import app
print(sorted(m for m in ("torch", "kvpress", "transformers") if m in sys.modules))
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_api_reference_names_every_public_export():
    import polykv_search

    page = (ROOT / "docs" / "api.md").read_text()
    assert [name for name in polykv_search._EXPORTS if f"- `{name}` (" not in page] == []

"""Product code only in the package: no module of zipkv/ imports a private name of another
module or anything of the repository's benchmarks/ or experiments/, and zipkv/ ships no
result data (JSON, logs, plots)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "zipkv"
REPO_ONLY = ("benchmarks", "experiments")  # folders of the checkout, not of the package


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an ImportFrom reads, as an absolute dotted name."""
    if node.level == 0:
        return node.module or ""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    base = parts[:-node.level] if path.name != "__init__.py" else parts[:len(parts) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(path: Path, source: str | None = None) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path}:{node.lineno}: from {absolute(path, node)} import {alias.name}")
    return found


def repo_imports(path: Path, source: str | None = None) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        else:
            continue
        found += [f"{path}:{node.lineno}: {n}" for n in names if n.split(".")[0] in REPO_ONLY]
    return found


def test_the_checks_see_what_they_look_for():
    """The detectors on a module that breaks every rule (so the tests below do not pass by
    finding nothing at all); parsed as if it were zipkv/cache/probe.py, nothing written."""
    where = PACKAGE / "cache" / "probe.py"
    source = ("from .layer import _helper\nfrom . import _private\nfrom .layer import __all__\n"
              "import benchmarks.e2e_decode\nfrom experiments import notes\n"
              "import importlib\nimportlib.import_module('benchmarks.x')\n")
    assert [f.split(": ", 1)[1] for f in private_imports(where, source)] == [
        "from zipkv.cache.layer import _helper", "from zipkv.cache import _private"]
    assert [f.rsplit(": ", 1)[1] for f in repo_imports(where, source)] == [
        "benchmarks.e2e_decode", "experiments", "benchmarks.x"]


def test_no_module_imports_a_private_name_of_another_module():
    found = [f for path in modules() for f in private_imports(path)]
    assert found == [], "make the helper public (drop the underscore) where it belongs:\n" + "\n".join(found)


def test_the_package_never_imports_the_repositorys_benchmarks_or_experiments():
    found = [f for path in modules() for f in repo_imports(path)]
    assert found == [], "\n".join(found)


def test_the_package_holds_no_result_data():
    data = [p for p in PACKAGE.rglob("*") if p.suffix in (".json", ".jsonl", ".csv", ".log", ".png", ".txt")
            and "__pycache__" not in p.parts]
    assert data == [], f"result data belongs in results/ or benchmarks/results/: {data}"
    # benchmark code lives in benchmarks/; the package keeps only the command that runs it
    assert [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("bench*.py")] == ["bench_cli.py"]

"""The house rules, checked: the import-linter contracts in pyproject.toml (the student wing never
imports the teacher pass or the corpus readers; storage never imports pipeline; wings layered along
the data path), no import cycle between modules, no project module imported by a string, and every
package folder installed under `kdcache`."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # {"kdcache.pipeline": "pipeline", ...}


def _lint_imports(config: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    code = ("import sys\n"
            + (f"sys.path.insert(0, {str(extra_path)!r})\n" if extra_path else "")
            + "from importlinter.cli import lint_imports\n"
            + f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, bad_import", [
    ("pipeline/student/losses.py", "from kdcache.pipeline.teacher_pass import teacher"),
    ("pipeline/student/losses.py", "from kdcache.pipeline.data import corpus"),
    ("storage/reader.py", "from kdcache.pipeline.common import jsonout"),
    ("pipeline/common/runtime.py", "from kdcache.pipeline.cli import main"),
])
def test_contracts_fail_on_a_deliberately_bad_import(tmp_path, module, bad_import):
    """The same contracts over a copy of the tree with one forbidden import added must break."""
    pkg = tmp_path / "kdcache"
    pkg.mkdir()
    for name, folder in PACKAGE_DIRS.items():
        shutil.copytree(ROOT / folder, pkg / name.split(".", 1)[1],
                        ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "*.sh"))
    target = pkg / module
    target.write_text(target.read_text() + f"\n{bad_import}\n")
    config = tmp_path / "pyproject.toml"
    config.write_text((ROOT / "pyproject.toml").read_text())
    # A namespace `kdcache` from the copy only: the installed one must not shadow it.
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r});"
            "import importlib.machinery as m;"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__name__', str(f))];"
            "from importlinter.cli import lint_imports;"
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "broken" in result.stdout and bad_import.split()[1] in result.stdout, result.stdout[-3000:]


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def test_no_import_cycle_between_modules():
    """Lazy imports inside functions count too: a circle hidden in a function is still a circle."""
    import grimp

    graph = grimp.build_graph(*PACKAGE_DIRS, include_external_packages=False, cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported == importer or importer.startswith(imported + "."):
                continue  # a module importing its own package's __init__
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:20])


def test_no_project_module_is_imported_by_string():
    """`__import__("kdcache...")` / `import_module("kdcache...")` hides an edge from the contracts."""
    offenders = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name not in ("__import__", "import_module"):
                continue
            arg = node.args[0] if node.args else None
            literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            if not literal or arg.value.split(".")[0] in ("kdcache", "pipeline", "storage"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    # User code named in a config (a `student_factory`) is the one string import allowed, in one place.
    allowed = {"pipeline/common/hf.py"}
    assert [o for o in offenders if o.split(":")[0] not in allowed] == []


def test_every_package_folder_is_installed_under_kdcache():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    for module in _modules():  # nothing left at the generic top-level names
        assert module.startswith(("kdcache.pipeline", "kdcache.storage"))


def test_no_module_imports_the_generic_top_level_names():
    bad = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{module}: {n}" for n in names if n.split(".")[0] in ("pipeline", "storage")]
    assert bad == []


@pytest.mark.slow
def test_a_built_wheel_installs_every_wing_under_kdcache(tmp_path):
    """What a non-editable `pip install .` (the cluster image) ships: every package and its data files."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("kdcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    folders = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert folders == set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert not [n for n in names if n.split("/")[0] in ("pipeline", "storage", "tests")]
    recipes = [n for n in names if n.startswith("kdcache/pipeline/student/recipes/") and n.endswith(".yaml")]
    assert len(recipes) == len(list((ROOT / "pipeline/student/recipes").glob("*.yaml"))) > 0

"""The repository's layout and its declared dependencies, as a newcomer's fresh venv sees them."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("operator", "worker", "kernels")


def _importable_root_names() -> set[str]:
    """Names that `import NAME` finds as a regular package or module when the root is the current folder."""
    names = {p.stem for p in REPO.glob("*.py")}
    names |= {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def _installed_top_level_names() -> set[str]:
    """Top-level modules and packages of every installed distribution but this project's."""
    names: set[str] = set()
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] == "flexllm":
            continue
        names |= set((dist.read_text("top_level.txt") or "").split())
        names |= {Path(f.parts[0]).stem for f in dist.files or () if len(f.parts) <= 2 and f.suffix in ("", ".py")
                  and not f.parts[0].endswith((".dist-info", ".data"))}
    return names


def test_nothing_at_the_root_shadows_the_standard_library_or_an_installed_module():
    """From the root `python -m ...` imports these first: the standard library's `operator`, or the
    `kernels` distribution transformers >= 5 imports, must not lose to a root folder."""
    shadowing = _importable_root_names() & (set(sys.stdlib_module_names) | _installed_top_level_names())
    assert not shadowing, f"root entries shadow installed or standard-library modules: {sorted(shadowing)}"


def test_benchmark_scripts_shadow_no_installed_module():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path: a script named like an installed
    module would be imported in its place."""
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    shadowing = scripts & (_installed_top_level_names() | set(sys.stdlib_module_names))
    assert not shadowing, f"benchmark scripts named like installed modules: {sorted(shadowing)}"


def test_stdlib_and_pip_work_from_the_root():
    """`python -S` preloads nothing, as a fresh venv's interpreter: the root comes first on sys.path."""
    for argv in (["-S", "-c", "import collections, operator; operator.itemgetter"], ["-m", "pip", "--version"]):
        run = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{argv}: {run.stderr}"


def test_installed_package_maps_the_root_folders():
    import flexllm.kernels.rms_norm
    import flexllm.operator.models
    import flexllm.worker

    assert Path(flexllm.operator.models.__file__).parent.name == "operator"
    assert Path(flexllm.kernels.rms_norm.__file__).parent.name == "kernels"
    assert Path(flexllm.worker.__file__).parent.name == "worker"


def _imported_top_level_modules() -> set[str]:
    """Every module imported anywhere in the installed folders (function-level imports included)."""
    found: set[str] = set()
    for folder in SOURCE_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"flexllm", "__future__"}


def _declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    requirements += [r for extra, reqs in project["optional-dependencies"].items() if extra != "dev" for r in reqs]
    return {_canonical(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_runtime_import_is_declared():
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level_modules()):
        dists = {_canonical(d) for d in providers.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported at run time but not in pyproject.toml's dependencies: {undeclared}"


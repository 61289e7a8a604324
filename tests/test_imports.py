"""dvc.yaml deps are exactly what each stage imports: its transitive closure of package modules, computed from the code.

Imports are dependencies (a stage must rerun when code it runs changes, and must not rerun for code it never runs),
so for every stage the files under ``spinedxa/`` that ``stages/<verb>.py`` reaches through ``import`` statements
(module level or inside functions, found with :mod:`ast`) must be exactly the package files its ``deps`` list,
both ways. A directory dep (``spinedxa/models``) stands for every file in it. Package ``__init__.py`` files that
hold nothing but a docstring run no code and are not dependencies; non-Python package data (``spinedxa/templates``)
is a dependency of the stages that read it and is checked separately.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from spinedxa import dag

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "spinedxa"
#: Package data (not imported, read at run time) -> the stages whose code reads it.
DATA_DEPS = {
    "spinedxa/templates": {"report"},
    "spinedxa/templates/web": {"validate", "external"},
}


def _module_file(module: str) -> Path | None:
    """The file of a ``spinedxa...`` module (a package's ``__init__.py``), or None if it is not in the repo."""
    base = REPO / Path(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _runs_code(init: Path) -> bool:
    """False for an ``__init__.py`` holding only a docstring (importing it executes nothing)."""
    body = ast.parse(init.read_text(encoding="utf-8")).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def _imports(path: Path) -> set[str]:
    """``spinedxa`` modules imported anywhere in ``path`` (``from spinedxa import x`` counts x if it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def closure(script: Path) -> set[str]:
    """Repo-relative package files the script imports, transitively (parent packages' ``__init__`` included)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        current = todo.pop()
        for module in _imports(current):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then a/b/c
                file = _module_file(".".join(parts[:i]))
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    top = REPO / PACKAGE / "__init__.py"
    return {f.relative_to(REPO).as_posix() for f in seen
            if f != top and (f.name != "__init__.py" or _runs_code(f))}


def _covered(files: set[str], deps: set[str]) -> set[str]:
    """The files not covered by a dep (a file dep, or a directory dep above them)."""
    return {f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)}


STAGES = dag.load_stages(REPO)


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_deps_are_exactly_the_import_closure(stage: dag.Stage) -> None:
    script = REPO / "stages" / f"{stage.verb}.py"
    assert f"stages/{stage.verb}.py" in stage.dep_paths, f"{stage.name}: its own script is not a dep"
    imported = closure(script)
    code_deps = {d for d in stage.dep_paths if d.startswith(f"{PACKAGE}/") and d not in DATA_DEPS}
    missing = _covered(imported, code_deps)
    assert not missing, f"{stage.name} imports {sorted(missing)} but dvc.yaml does not list them as deps"
    listed: set[str] = set()  # every package file the deps stand for (a directory: each .py file in it)
    for d in code_deps:
        path = REPO / d
        listed |= ({p.relative_to(REPO).as_posix() for p in path.rglob("*.py") if "__pycache__" not in p.parts}
                   if path.is_dir() else {d})
    top = f"{PACKAGE}/__init__.py"
    extra = {f for f in listed - imported - {top} if not (f.endswith("__init__.py") and not _runs_code(REPO / f))}
    assert not extra, f"{stage.name}: dvc.yaml lists {sorted(extra)}, which the stage never imports"


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_package_data_deps_belong_to_the_stages_that_read_them(stage: dag.Stage) -> None:
    for data, readers in DATA_DEPS.items():
        assert (data in stage.dep_paths) == (stage.verb in readers), (stage.name, data)


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_no_dep_is_listed_twice(stage: dag.Stage) -> None:
    """A repeated dep is hashed twice and written twice to dvc.lock on every `dvc repro` for nothing (issue 19)."""
    repeated = sorted({d for d in stage.dep_paths if stage.dep_paths.count(d) > 1})
    assert not repeated, f"{stage.name}: dvc.yaml lists {repeated} more than once"


def test_bytecode_caches_are_not_part_of_directory_deps() -> None:
    """Importing a package writes ``__pycache__`` beside its sources; inside a directory dep (spinedxa/models) that
    would change its hash and re-run every stage that imports it, with no source changed. .dvcignore keeps them out,
    so a directory dep stands for its sources only (as the closure check above assumes)."""
    from dvc.repo import Repo

    repo = Repo(str(REPO))
    for directory in ("spinedxa/models", "spinedxa/templates"):
        pyc = str(REPO / directory / "__pycache__" / "x.cpython-311.pyc")
        assert repo.dvcignore.is_ignored(repo.fs, pyc), f"{directory}/__pycache__ is not in .dvcignore"
    assert not repo.dvcignore.is_ignored(repo.fs, str(REPO / "spinedxa/models/cnn21.py"))


def test_dvc_parses_yaml_with_the_c_extension() -> None:
    """DVC parses dvc.lock (~2,000 lines) twice and params.yaml once per stage on every `dvc repro`: in pure Python
    that is ~0.5 of the ~1.9 CPU seconds of a no-op repro on a 2-core EPYC (bench/noop.py, tiny profile). ruamel.yaml
    0.19 stopped installing its C extension: pyproject.toml asks for ruamel.yaml.clib, which its safe loader imports."""
    import ruamel.yaml.main

    assert ruamel.yaml.main.CParser is not None, "ruamel.yaml runs in pure Python: pip install -e . (ruamel.yaml.clib)"


def test_closure_follows_imports_inside_functions(tmp_path: Path) -> None:
    """The closure must see lazy imports: a stage that imports one module inside a function depends on it."""
    script = tmp_path / "x.py"
    script.write_text("def f():\n    from spinedxa.contracts import png16\n    return png16\n", encoding="utf-8")
    assert closure(script) == {"spinedxa/contracts/png16.py", "spinedxa/files.py"}


def test_numpy_pin_admits_no_release_without_the_apis_the_code_uses() -> None:
    """The code calls ``np.bitwise_count`` and the tests ``np.trapezoid`` (numpy >= 2.0): pyproject must not allow
    a numpy 1.x that would install and then fail at run time."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    numpy = next(Requirement(d) for d in deps if Requirement(d).name == "numpy")
    assert not numpy.specifier.contains("1.26.4"), numpy
    assert numpy.specifier.contains("2.0.0"), numpy
    uses = [p for p in (REPO / "spinedxa").rglob("*.py") if "bitwise_count" in p.read_text(encoding="utf-8")]
    assert uses, "np.bitwise_count no longer used: the pin may be relaxed"

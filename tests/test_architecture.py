"""The package the images install, checked from outside: a wheel built from the folder the Dockerfiles copy holds
the library only, in layers whose imports point down; and CI runs the formatter and the linter.

The wheel is built offline from a copy of ``shared/`` (``pip wheel --no-deps --no-build-isolation --no-index``), so
that the checkout gets no build folder.
"""

from __future__ import annotations

import ast
import itertools
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gcinfer.pipelines import PIPELINES

REPOSITORY = Path(__file__).resolve().parents[1]
LIBRARY = REPOSITORY / "shared"
MAX_MODULE_LINES = 500
DEVELOPMENT = re.compile(r"(^|_)(fixtures?|checks|staging|demo|preview|references?|oracles?|metrics|training)(_|$)")
"""A module name part of the development tools (``gcinfer_dev``), e.g. ``fixtures`` or ``autopet_reference``."""
LAYERS = (
    (
        "gcinfer.errors",
        "gcinfer.config",
        "gcinfer.headers",
        "gcinfer.io",
        "gcinfer.cases",
        "gcinfer.devices",
        "gcinfer.background",
        "gcinfer.memory.budget",
    ),
    ("gcinfer.engine",),
    ("gcinfer.memory",),
    ("gcinfer.pipelines",),
    ("gcinfer.runner", "gcinfer.cli", "gcinfer.entrypoint", "gcinfer"),
)
"""Bottom first: a module may import its own layer and the layers below it (``TYPE_CHECKING`` imports aside).
The memory budget probes (:mod:`gcinfer.memory.budget`: cgroup, rlimits, free device memory) are the operating
system's answers, read by the I/O layer too (an image's voxels against the host's budget, before reading them)."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    work = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(LIBRARY, work / "shared", ignore=shutil.ignore_patterns("*.egg-info", "build"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    built = subprocess.run([*command, str(source), "-w", str(work)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (path,) = work.glob("gcinfer-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def modules(wheel: zipfile.ZipFile) -> dict[str, str]:
    """Dotted module name -> source of every Python file in the wheel."""
    names = [n for n in wheel.namelist() if n.endswith(".py")]
    return {n[: -len(".py")].replace("/", ".").removesuffix(".__init__"): wheel.read(n).decode() for n in names}


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of the longest prefix naming ``module`` or a package holding it."""
    matches = [
        (len(p), i) for i, names in enumerate(LAYERS) for p in names if module == p or module.startswith(p + ".")
    ]
    return max(matches)[1]


def runtime_imports(source: str, module: str) -> set[str]:
    """The ``gcinfer`` modules ``source`` imports outside ``if TYPE_CHECKING:`` blocks (relative ones resolved)."""
    tree = ast.parse(source)
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*module.split(".")[: -node.level], *([base] if base else [])])
            found.add(base)
    return {name for name in found if name == "gcinfer" or name.startswith("gcinfer.")}


def test_the_dockerfiles_install_the_folder_the_wheel_is_built_from() -> None:
    """Every pipeline's image (the invoke-mode variant, docker/invoke/, derives from them)."""
    for spec in PIPELINES:
        dockerfile = REPOSITORY / "docker" / spec.container / "Dockerfile"
        assert re.search(r"^COPY shared/ ", dockerfile.read_text(), re.MULTILINE), dockerfile


def test_the_wheel_holds_the_library_only(wheel: zipfile.ZipFile) -> None:
    sources = modules(wheel)
    assert {name.split(".")[0] for name in sources} == {"gcinfer"}
    assert not [name for name in sources if any(DEVELOPMENT.search(part) for part in name.split("."))]
    assert not [name for name, text in sources.items() if re.search(r"^\s*(from|import) gcinfer_dev", text, re.M)]
    data = [n for n in wheel.namelist() if not n.endswith(".py") and ".dist-info/" not in n]
    assert data == []


def test_the_wheel_shows_its_layers_in_sub_packages(wheel: zipfile.ZipFile) -> None:
    packages = {n.removesuffix("/__init__.py") for n in wheel.namelist() if n.endswith("/__init__.py")}
    assert {"gcinfer/engine", "gcinfer/memory", "gcinfer/pipelines"} <= packages
    assert len(packages - {"gcinfer"}) >= 2


def test_no_module_is_over_500_lines(wheel: zipfile.ZipFile) -> None:
    lengths = {name: len(text.splitlines()) for name, text in modules(wheel).items()}
    assert {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_imports_point_down_the_layers(wheel: zipfile.ZipFile) -> None:
    upward = {
        f"{module} -> {imported}"
        for module, source in modules(wheel).items()
        for imported in runtime_imports(source, module)
        if layer(imported) > layer(module)
    }
    assert upward == set()


def test_the_layer_check_sees_an_upward_import() -> None:
    source = "from gcinfer.runner import StageLog\nif TYPE_CHECKING:\n    import gcinfer.cli\n"
    assert runtime_imports(source, "gcinfer.engine.tiling") == {"gcinfer.runner"}
    assert runtime_imports("from .windows import tile_slices", "gcinfer.engine.tiling") == {"gcinfer.engine.windows"}
    assert layer("gcinfer.runner") > layer("gcinfer.engine.tiling") > layer("gcinfer.io")


def make_recipe(target: str) -> list[str]:
    """The recipe lines of ``target`` in the Makefile (the tab-indented lines after ``target:``), stripped."""
    lines = (REPOSITORY / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    return [line.strip() for line in itertools.takewhile(lambda line: line.startswith("\t"), lines[start + 1 :])]


def test_ci_runs_the_linter_and_the_formatter_check() -> None:
    ci = [line.strip() for line in (REPOSITORY / ".ci" / "run").read_text().splitlines()]
    assert "make lint" in ci
    recipe = make_recipe("lint")
    assert any(re.fullmatch(r"\S*ruff check( \.)?", line) for line in recipe), recipe
    assert any(re.fullmatch(r"\S*ruff format --check( \.)?", line) for line in recipe), recipe


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["ruff check", "ruff format --check"])
def test_the_tree_passes_ruff(command: list[str]) -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    result = subprocess.run([ruff, *command, "."], cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

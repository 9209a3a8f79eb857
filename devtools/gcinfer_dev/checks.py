"""Checks of a container's outputs against the library's own outputs and the phantoms' ground truth.

Used by ``test.sh`` and ``test_autopet.sh`` as ``python -m gcinfer_dev.checks <command>`` (a tool module of the
``gcinfer`` CLI: ``add_arguments`` and ``run``):

- ``outputs``: the expected files and only those (the library's own case discovery on the same input), each a
  uint8 label map on exactly its input's grid (``.mha``: also as panimg imports it, :mod:`gcinfer_dev.panimg_check`),
  voxel-identical to the library's output for the same input and
  weights computed on the host, and a mean Dice against the ground truth at or above the demo's target;
- ``gc-input``: cases (flat folder or Grand Challenge layout) rewritten as one Grand Challenge job input:
  ``images/<socket>/<case>.mha`` and ``inputs.json``;
- ``fingerprint``: a hash of the library, options and files, the key of ``test.sh``'s reference cache;
- ``fixture-args``: the extra pipeline options the fixture models need (``--folds 0 1`` for AMOS);
- ``autopet-dataset``: write an AutoPET NIfTI dataset (``<patient>/<study>/SUV.nii.gz, CTres.nii.gz,
  SEG.nii.gz``) of fixture PET/CT phantoms;
- ``autopet-stage``: split an AutoPET dataset into one Grand Challenge input folder per study;
- ``autopet-score``: the challenge metrics of every study's output (:mod:`gcinfer_dev.metrics`), a CSV, a summary
  and, with ``--min-dice``, the mean Dice checked against a target.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from gcinfer.cases import Case, discover_cases
from gcinfer.config import Sockets, read_json
from gcinfer.errors import InputError
from gcinfer.io import Geometry, case_name, image_suffix, read_header, read_image
from gcinfer_dev.demo import TASKS, DemoTask
from gcinfer_dev.metrics import EMPTY_CASE, LesionScores, case_dice, format_dice, mean_dice, summarize_scores
from gcinfer_dev.metrics import score_study as score_lesions

GEOMETRY_ATOL = 1e-4
"""mm (spacing, origin) and cosine (direction) tolerance of a written geometry against its input's."""
NIFTI_STUDY_FILES = ("SUV.nii.gz", "CTres.nii.gz", "SEG.nii.gz")
STAGING_FAILED = "staging"
"""The status of a study whose input could not be staged (no container run)."""


def task(folder: str) -> DemoTask:
    """The demo's task of container folder ``folder`` (its command, fixture options and Dice target)."""
    found = [t for t in TASKS if t.folder == folder]
    if not found:
        raise InputError(f"{folder}: not a container folder (one of {', '.join(t.folder for t in TASKS)})")
    return found[0]


def header_geometry(path: Path) -> Geometry:
    """The :class:`Geometry` of an image file, from its header only."""
    return read_header(path).geometry


def geometry_differences(actual: Geometry, expected: Geometry) -> list[str]:
    """What differs between two geometries (size exactly, the rest within :data:`GEOMETRY_ATOL`)."""
    problems = [] if actual.size == expected.size else [f"size {actual.size} != {expected.size}"]
    for field in ("spacing", "origin", "direction"):
        a, e = getattr(actual, field), getattr(expected, field)
        if not np.allclose(a, e, rtol=0.0, atol=GEOMETRY_ATOL):
            problems.append(f"{field} {tuple(round(v, 6) for v in a)} != {tuple(round(v, 6) for v in e)}")
    return problems


def images_by_case(folder: Path) -> dict[str, Path]:
    """Every image under ``folder`` (recursively) by case name."""
    return {case_name(p): p for p in sorted(folder.rglob("*")) if p.is_file() and image_suffix(p)}


def expected_files(cases: Sequence[Case], output_dir: Path, config: dict) -> set[Path]:
    """The files a run must leave in ``output_dir``: one label map per case, plus the AutoPET JSON if configured."""
    expected = {c.output for c in cases}
    if config.get("write_data_centric_json"):
        expected.add(output_dir / "data-centric-model.json")
    return expected


@dataclass
class CaseCheck:
    """The findings for one output file."""

    path: Path
    problems: list[str]
    dice: float | None = None
    empty: bool = False
    """Neither the truth nor the output has foreground: no Dice (:data:`~gcinfer_dev.metrics.EMPTY_CASE`)."""
    differing_voxels: int | None = None


def check_case(
    case: Case, first_socket: str, reference: Path | None, truth: Path | None, max_mismatch: float
) -> CaseCheck:
    """Check one written label map: readable, uint8, its input's grid, equal to the reference, Dice vs truth."""
    result = CaseCheck(case.output, [])
    try:
        labels, geometry = read_image(case.output)
    except InputError as error:
        result.problems.append(str(error))
        return result
    if labels.dtype != np.uint8:
        result.problems.append(f"dtype {labels.dtype}, expected uint8")
    expected_geometry = header_geometry(case.inputs[first_socket])
    result.problems += geometry_differences(geometry, expected_geometry)
    if case.output.suffix == ".mha":  # the Grand Challenge layout, whose outputs Grand Challenge imports with panimg
        from gcinfer_dev.panimg_check import check_file

        result.problems += check_file(case.output, expected_geometry)
    if reference is None:
        result.problems.append("no reference output of the library for this case")
    else:
        expected, _ = read_image(reference)
        if expected.shape != labels.shape:
            result.problems.append(f"shape {labels.shape} != reference {expected.shape}")
        else:
            result.differing_voxels = int(np.count_nonzero(expected != labels))
            if result.differing_voxels > max_mismatch * labels.size:
                result.problems.append(
                    f"{result.differing_voxels} voxel(s) differ from the library's output {reference}"
                )
    if truth is None:
        result.problems.append("no ground truth for this case")
        return result
    truth_labels, _ = read_image(truth)
    if truth_labels.shape != labels.shape:
        result.problems.append(f"shape {labels.shape} != ground truth {truth_labels.shape}")
        return result
    result.dice = case_dice(labels, truth_labels)
    result.empty = result.dice is None
    return result


def check_outputs(
    folder: str,
    config_path: Path,
    input_dir: Path,
    output_dir: Path,
    reference_dir: Path,
    labels_dir: Path,
    max_mismatch: float = 0.0,
    reference_name: str = "the library",
) -> bool:
    """Check a run's output folder; print one line per file and a summary line; True when everything passed.

    ``reference_name`` says in the summary what the outputs in ``reference_dir`` are."""
    config = read_json(config_path)
    sockets = Sockets.of(config, config_path)
    cases = discover_cases(input_dir, output_dir, sockets)
    expected = expected_files(cases, output_dir, config)
    present = {p for p in output_dir.rglob("*") if p.is_file()}
    problems = [f"missing output {p}" for p in sorted(expected - present)]
    problems += [f"unexpected file {p}" for p in sorted(present - expected)]
    references, truths = images_by_case(reference_dir), images_by_case(labels_dir)
    checks = [
        check_case(c, sockets.inputs[0], references.get(c.name), truths.get(c.name), max_mismatch)
        for c in cases
        if c.output in present
    ]
    for check in checks:
        status = "ok" if not check.problems else "FAILED: " + "; ".join(check.problems)
        differ = f"{check.differing_voxels} voxel(s) differ"
        dice = format_dice(check.dice) if check.dice is not None or check.empty else "n/a"
        print(f"  {check.path.relative_to(output_dir)}: {differ}, Dice {dice}, {status}")
    problems += [f"{c.path}: {p}" for c in checks for p in c.problems]
    mean = mean_dice([c.dice for c in checks])
    target = task(folder).target
    if mean is None:
        problems.append(f"no case to score Dice on (each is '{EMPTY_CASE}' or has no ground truth)")
    elif mean < target:
        problems.append(f"mean Dice {mean:.3f} below the target {target}")
    for problem in problems:
        print(f"  FAILED {problem}")
    identical = sum(c.differing_voxels == 0 for c in checks)
    scored = sum(c.dice is not None for c in checks)
    mean_text = "n/a" if mean is None else f"{mean:.3f}"
    print(
        f"summary: {len(checks)}/{len(expected)} file(s), {identical} identical to {reference_name}, "
        f"mean Dice {mean_text} (>= {target}) over {scored} case(s) with foreground"
    )
    return not problems


def fingerprint(paths: Sequence[Path], extra: str = "") -> str:
    """A hash of ``extra``, the library's own sources and every file under ``paths`` (names and contents).

    ``test.sh`` keys its cache of the library's reference outputs with it: same library, config, input,
    weights and options give the same outputs.
    """
    import gcinfer

    digest = hashlib.sha256(f"{extra}\0torch {version('torch')}\0".encode())
    for root in (Path(gcinfer.__file__).parent, *map(Path, paths)):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{path.relative_to(root) if root.is_dir() else path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _resample_to(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, image.GetPixelID())


def write_autopet_dataset(root: Path, studies: int, seed: int) -> list[Path]:
    """Write ``studies`` fixture PET/CT phantoms as an AutoPET NIfTI dataset; returns the study folders.

    Layout: ``root/PETCT_<k>/<date>-NA-PET-CT/{SUV,CTres,SEG}.nii.gz``: SUV float32, CTres int16 HU resampled
    onto the PET grid (as AutoPET's CTres), SEG uint8 lesion mask. Study ``k`` is the phantom
    ``make_pair(seed * 100 + k)``; the first two are the fixture's own sample pairs.
    """
    from gcinfer_dev.fixtures.petct import SAMPLE_DIRECTIONS, make_pair

    folders = []
    for k in range(studies):
        pair = make_pair(seed * 100 + k, SAMPLE_DIRECTIONS[k % len(SAMPLE_DIRECTIONS)])
        folder = Path(root) / f"PETCT_{k:04d}" / f"2026-01-{k + 1:02d}-NA-PET-CT"
        folder.mkdir(parents=True, exist_ok=True)
        pet = pair.pet_geometry.apply_to(sitk.GetImageFromArray(pair.pet))
        ct = pair.ct_geometry.apply_to(sitk.GetImageFromArray(pair.ct))
        seg = pair.pet_geometry.apply_to(sitk.GetImageFromArray(pair.lesions))
        for image, name in zip((pet, _resample_to(ct, pet), seg), NIFTI_STUDY_FILES):
            sitk.WriteImage(image, str(folder / name), useCompression=True)
        folders.append(folder)
    return folders


@dataclass(frozen=True)
class Study:
    """One AutoPET study: an identifier, its images per input socket and its lesion mask."""

    name: str
    inputs: dict[str, Path]
    label: Path


def nifti_studies(dataset: Path, sockets: Sockets) -> list[Study]:
    """Studies of the AutoPET NIfTI layout: ``<patient>/<study>/SUV.nii.gz, CTres.nii.gz, SEG.nii.gz``."""
    pet_socket, ct_socket = sockets.inputs
    studies = []
    for suv in sorted(dataset.glob("*/*/SUV.nii.gz")):
        folder = suv.parent
        missing = [n for n in NIFTI_STUDY_FILES if not (folder / n).is_file()]
        if missing:
            raise InputError(f"{folder}: missing {', '.join(missing)}")
        name = f"{folder.parent.name}_{folder.name}"
        studies.append(Study(name, {pet_socket: suv, ct_socket: folder / "CTres.nii.gz"}, folder / "SEG.nii.gz"))
    return studies


def grand_challenge_studies(dataset: Path, sockets: Sockets) -> list[Study]:
    """Studies of a Grand Challenge layout with labels: ``[input/]images/<socket>/<uuid>.mha`` + ``labels/``."""
    inputs = dataset / "input" if (dataset / "input" / "images").is_dir() else dataset
    labels = images_by_case(dataset / "labels")
    studies = []
    for case in discover_cases(inputs, dataset / "unused-output", sockets):
        if case.error:
            raise InputError(case.error)
        if case.name not in labels:
            raise InputError(f"{dataset / 'labels'}: no label map named '{case.name}'")
        studies.append(Study(case.name, dict(case.inputs), labels[case.name]))
    return studies


def find_studies(dataset: Path, sockets: Sockets) -> list[Study]:
    """The studies of ``dataset`` in either layout.

    Raises:
        InputError: neither layout found, or an incomplete study.
    """
    if not dataset.is_dir():
        raise InputError(f"{dataset}: dataset folder not found")
    studies = nifti_studies(dataset, sockets)
    if not studies and any((dataset / d / "images").is_dir() for d in (".", "input")):
        studies = grand_challenge_studies(dataset, sockets)
    if not studies:
        raise InputError(
            f"{dataset}: no study found (expected <patient>/<study>/SUV.nii.gz, CTres.nii.gz, SEG.nii.gz, "
            "or a Grand Challenge layout [input/]images/<socket>/<uuid>.mha with labels/<uuid>.mha)"
        )
    return studies


def write_inputs_json(folder: Path, sockets: Sockets) -> Path:
    """``folder/inputs.json`` as Grand Challenge writes it for a job: one entry per input socket (image kind)."""
    entries = [
        {"interface": {"slug": s, "kind": "Image", "relative_path": f"images/{s}"}, "value": None, "file": None}
        for s in sockets.inputs
    ]
    path = folder / "inputs.json"
    path.write_text(json.dumps(entries, indent=2))
    return path


def convert_to_mha(source: Path, target: Path) -> Path:
    """Rewrite an image as a compressed ``.mha``: same voxels, pixel type and geometry, no other header fields.

    Raises:
        InputError: the source is unreadable, truncated or not a valid 3D scalar image (as the pipelines check).
    """
    array, geometry = read_image(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(array)), str(target), useCompression=True)
    return target


def write_job(cases: Sequence[Case | Study], folder: Path, sockets: Sockets) -> Path:
    """Write ``cases`` as a Grand Challenge job input: ``folder/images/<socket>/<case>.mha`` and ``inputs.json``.

    Case names are kept as the file names, so that the outputs pair with the cases (and labels) by name.
    """
    for case in cases:
        for socket in sockets.inputs:
            convert_to_mha(case.inputs[socket], folder / "images" / socket / f"{case.name}.mha")
    write_inputs_json(folder, sockets)
    return folder


def write_grand_challenge_input(source_dir: Path, target: Path, config_path: Path) -> Path:
    """Rewrite the cases of ``source_dir`` (flat or Grand Challenge layout) as one Grand Challenge job in ``target``."""
    sockets = Sockets.of(read_json(config_path), config_path)
    cases = discover_cases(source_dir, target / "unused-output", sockets)
    for case in cases:
        if case.error:
            raise InputError(case.error)
    return write_job(cases, target, sockets)


def stage_dataset(dataset: Path, work: Path, config_path: Path) -> Path:
    """Stage every study under ``work/<study>/input``; write ``work/studies.tsv`` (name, input, label).

    A study whose images cannot be read gets input ``-``, ``status`` ``staging 0`` and a ``log.txt`` saying why.
    """
    sockets = Sockets.of(read_json(config_path), config_path)
    studies = find_studies(dataset, sockets)
    table = work / "studies.tsv"
    work.mkdir(parents=True, exist_ok=True)
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for study in studies:
            folder = work / study.name
            try:
                staged = write_job([study], folder / "input", sockets)
            except InputError as error:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "log.txt").write_text(f"cannot stage the inputs: {error}\n")
                (folder / "status").write_text(f"{STAGING_FAILED} 0\n")
                staged = "-"
            writer.writerow([study.name, staged, study.label.resolve()])
    return table


"""Status code of a study whose inputs could not be converted (its log.txt says why)."""
CSV_FIELDS = (
    "study",
    "status",
    "dice",
    "false_positive_ml",
    "false_negative_ml",
    "truth_ml",
    "predicted_ml",
    "seconds",
    "output",
)


def score_study(work: Path, name: str, label: Path, output_socket: str) -> tuple[dict[str, str], LesionScores | None]:
    """One CSV row: the study's run status (``<work>/<name>/status``) and, when it ran, its AutoPET scores."""
    status_file = work / name / "status"
    output = work / name / "output" / "images" / output_socket / f"{name}.mha"
    log_file = work / name / "log.txt"
    code, seconds = status_file.read_text().split() if status_file.is_file() else ("not-run", "")
    row = {"study": name, "seconds": seconds, "output": str(output)}
    if code == STAGING_FAILED:
        return {**row, "status": f"failed ({log_file.read_text().strip()})"}, None
    if code != "0":
        return {**row, "status": f"failed (exit {code}, log {log_file})"}, None
    try:
        scores = score_lesions(output, label)
    except InputError as error:
        return {**row, "status": f"failed ({error})"}, None
    values = {field: f"{getattr(scores, field):.4f}" for field in LesionScores.__dataclass_fields__}
    return {**row, "status": "ok", **values}, scores


def score_dataset(work: Path, config_path: Path, csv_path: Path, min_dice: float | None = None) -> bool:
    """Score every study of ``work/studies.tsv``; write ``csv_path``, print the summary.

    Returns:
        True when every study was scored and, with ``min_dice``, the mean Dice over the studies with lesions is
        at least ``min_dice`` (a dataset without any lesion cannot meet a target).
    """
    output_socket = Sockets.of(read_json(config_path), config_path).output
    with (work / "studies.tsv").open() as handle:
        studies = list(csv.reader(handle, delimiter="\t"))
    results = [score_study(work, name, Path(label), output_socket) for name, _, label in studies]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(row for row, _ in results)
    for row, scores in results:
        if scores is None:
            print(f"FAILED {row['study']}: {row['status']}")
    scored = {row["study"]: scores for row, scores in results if scores is not None}
    print(f"{len(scored)}/{len(results)} studies scored; per study: {csv_path}")
    if scored:
        summary = summarize_scores(scored)
        print(
            f"mean Dice {summary['dice']:.4f} ({summary['studies_with_lesions']:.0f} studies with lesions), "
            f"false positive volume {summary['false_positive_volume_ml']:.2f} ml (all studies), "
            f"false negative volume {summary['false_negative_volume_ml']:.2f} ml (studies with lesions)"
        )
    target_met = min_dice is None or meets_dice_target(scored, min_dice)
    return len(scored) == len(results) and target_met


def meets_dice_target(scores: dict[str, LesionScores], min_dice: float) -> bool:
    """Print and check the mean Dice of the studies with lesions against ``min_dice`` (none with lesions: False)."""
    mean = summarize_scores(scores)["dice"] if scores else float("nan")
    if np.isnan(mean):
        print(f"FAILED no scored study with lesions: the Dice target {min_dice} cannot be checked")
        return False
    if mean < min_dice:
        print(f"FAILED mean Dice {mean:.4f} below the target {min_dice}")
        return False
    print(f"mean Dice {mean:.4f} >= {min_dice}")
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="check", required=True)
    outputs = commands.add_parser("outputs", help="check a run's outputs against the library's and the truth")
    outputs.add_argument("name", help="container folder: amos_task1, amos_task2 or autopet2")
    outputs.add_argument("--config", type=Path, required=True)
    outputs.add_argument("--input", type=Path, required=True, help="the run's input folder (host path)")
    outputs.add_argument("--output", type=Path, required=True, help="the run's output folder (host path)")
    outputs.add_argument("--reference", type=Path, required=True, help="the library's outputs for the same cases")
    outputs.add_argument("--labels", type=Path, required=True, help="ground truth label maps, named by case")
    outputs.add_argument("--max-mismatch", type=float, default=0.0, help="fraction of voxels allowed to differ")
    outputs.add_argument(
        "--reference-name", default="the library", help="what the --reference outputs are (for the summary line)"
    )
    gc_input = commands.add_parser("gc-input", help="cases rewritten as one Grand Challenge job input")
    gc_input.add_argument("source", type=Path, help="flat folder or Grand Challenge layout")
    gc_input.add_argument("target", type=Path)
    gc_input.add_argument("--config", type=Path, required=True)
    hashing = commands.add_parser("fingerprint", help="hash of the library, options and files (reference cache key)")
    hashing.add_argument("paths", type=Path, nargs="+")
    hashing.add_argument("--extra", default="", help="anything else the result depends on (options)")
    fixture_args = commands.add_parser("fixture-args", help="extra pipeline options the fixture models need")
    fixture_args.add_argument("name")
    dataset = commands.add_parser("autopet-dataset", help="write an AutoPET NIfTI dataset of fixture phantoms")
    dataset.add_argument("root", type=Path)
    dataset.add_argument("--studies", type=int, default=3)
    dataset.add_argument("--seed", type=int, default=0)
    stage = commands.add_parser("autopet-stage", help="one Grand Challenge input folder per study")
    stage.add_argument("dataset", type=Path)
    stage.add_argument("work", type=Path)
    stage.add_argument("--config", type=Path, required=True)
    score = commands.add_parser("autopet-score", help="AutoPET metrics of every staged study's output")
    score.add_argument("work", type=Path)
    score.add_argument("--config", type=Path, required=True)
    score.add_argument("--csv", type=Path, required=True)
    score.add_argument("--min-dice", type=float, help="fail when the mean Dice (studies with lesions) is lower")


def run(args: argparse.Namespace) -> int:
    if args.check == "outputs":
        ok = check_outputs(
            args.name,
            args.config,
            args.input,
            args.output,
            args.reference,
            args.labels,
            args.max_mismatch,
            args.reference_name,
        )
        return 0 if ok else 1
    if args.check == "fingerprint":
        print(fingerprint(args.paths, args.extra))
    elif args.check == "fixture-args":
        print(" ".join(task(args.name).extra_args))
    elif args.check == "gc-input":
        print(write_grand_challenge_input(args.source, args.target, args.config))
    elif args.check == "autopet-dataset":
        for folder in write_autopet_dataset(args.root, args.studies, args.seed):
            print(folder)
    elif args.check == "autopet-stage":
        print(stage_dataset(args.dataset, args.work, args.config))
    elif args.check == "autopet-score":
        return 0 if score_dataset(args.work, args.config, args.csv, args.min_dice) else 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcinfer_dev.checks", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

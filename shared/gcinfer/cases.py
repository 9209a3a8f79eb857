"""Finding the cases in an input folder and where their outputs go.

Two layouts are supported:

- Grand Challenge: ``<in>/images/<socket>/<uuid>.mha`` per input socket (``<in>/inputs.json``, when present,
  must list every socket the algorithm needs); outputs go to ``<out>/images/<output-socket>/<uuid>.mha``.
- Flat (AMOS organisers' style, single-input algorithms only): ``<in>/amos_0001.nii.gz`` ->
  ``<out>/amos_0001.nii.gz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gcinfer.config import Sockets, read_json
from gcinfer.errors import InputError, shown
from gcinfer.io import case_name, image_suffix


@dataclass(frozen=True)
class Case:
    """One job: the input image per socket and the output path.

    ``error`` is set for a case that cannot run (e.g. a PET without its CT); it is reported, not predicted.
    """

    name: str
    inputs: dict[str, Path]
    output: Path
    error: str | None = field(default=None, compare=False)


def _images_in(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted; hidden files are skipped, dangling symlinks are not (reading them
    fails with a message naming them)."""
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or p.is_symlink()) and not p.name.startswith(".") and image_suffix(p)
    )


def _check_inputs_json(input_dir: Path, sockets: Sockets) -> None:
    path = input_dir / "inputs.json"
    if not path.is_file():
        return
    entries = read_json(path, expect=list)
    try:
        listed = {Path(e["interface"]["relative_path"]).name for e in entries}
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{shown(path)}: not a Grand Challenge inputs.json ({type(error).__name__}: {error})"
        ) from None
    missing = [s for s in sockets.inputs if s not in listed]
    if missing:
        raise InputError(f"{shown(path)}: socket(s) {', '.join(missing)} not listed (has: {', '.join(sorted(listed))})")


def _grand_challenge_cases(input_dir: Path, output_dir: Path, sockets: Sockets) -> list[Case]:
    _check_inputs_json(input_dir, sockets)
    per_socket: dict[str, list[Path]] = {}
    for socket in sockets.inputs:
        folder = input_dir / "images" / socket
        files = _images_in(folder) if folder.is_dir() else []
        if not files:
            raise InputError(f"{shown(folder)}: no image for input socket '{socket}'")
        per_socket[socket] = files
    out_folder = output_dir / "images" / sockets.output
    first, *_others = sockets.inputs
    if all(len(files) == 1 for files in per_socket.values()):
        name = case_name(per_socket[first][0])
        inputs = {s: files[0] for s, files in per_socket.items()}
        return [Case(name, inputs, out_folder / f"{name}.mha")]
    grouped = {s: _by_case_name(files) for s, files in per_socket.items()}
    names = sorted(set().union(*(set(d) for d in grouped.values())))
    cases = []
    for name in names:
        inputs = {s: grouped[s][name][0] for s in sockets.inputs if name in grouped[s]}
        missing = [s for s in sockets.inputs if s not in inputs]
        shared = next((paths for paths in (grouped[s].get(name, []) for s in sockets.inputs) if len(paths) > 1), None)
        error = None
        if shared:
            error = _shared_name_error(name, shared)
        elif missing:
            have = ", ".join(shown(p) for p in inputs.values())
            error = f"{have}: no matching image named {name!r} in socket(s) {', '.join(missing)}"
        cases.append(Case(name, inputs, out_folder / f"{name}.mha", error))
    return cases


def _flat_cases(input_dir: Path, output_dir: Path, sockets: Sockets) -> list[Case]:
    if len(sockets.inputs) != 1:
        raise InputError(
            f"{shown(input_dir)}: a flat folder of images only serves single-input algorithms; "
            f"use the Grand Challenge layout images/<socket>/ for sockets {', '.join(sockets.inputs)}"
        )
    files = _images_in(input_dir)
    if not files:
        raise InputError(f"{shown(input_dir)}: no .mha, .nii or .nii.gz image found")
    return [
        Case(name, {sockets.inputs[0]: paths[0]}, output_dir / paths[0].name, _shared_name_error(name, paths))
        for name, paths in _by_case_name(files).items()
    ]


def _by_case_name(files: list[Path]) -> dict[str, list[Path]]:
    """The files of a folder grouped by case name (``a.mha`` and ``a.nii.gz`` are both case ``a``), sorted."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(case_name(path), []).append(path)
    return dict(sorted(groups.items()))


def _shared_name_error(name: str, paths: list[Path]) -> str | None:
    """The error of a case whose name several files share (one would silently win), None for a single file."""
    if len(paths) < 2:
        return None
    return f"{', '.join(shown(p) for p in paths)}: {len(paths)} images share the case name {name!r}; keep one"


def _check_outputs_spare_inputs(cases: list[Case]) -> None:
    """Refuse a run that would replace an input image by a label map (flat layout with ``--output`` = ``--input``).

    Raises:
        InputError: names the output and the input it resolves to.
    """
    inputs = {path.resolve(): path for case in cases for path in case.inputs.values()}
    for case in cases:
        overwritten = inputs.get(case.output.resolve())
        if overwritten is not None:
            raise InputError(
                f"{shown(case.output)}: the output would overwrite the input image {shown(overwritten)}; "
                "choose an output folder other than the input folder"
            )


def discover_cases(input_dir: Path | str, output_dir: Path | str, sockets: Sockets) -> list[Case]:
    """List the cases of ``input_dir``.

    The Grand Challenge layout is used when ``input_dir/images`` exists, else the flat layout.

    Several files with one case name (``a.mha``, ``a.nii.gz``) make one failed case (its ``error`` says why).

    Raises:
        InputError: missing or empty input folder, missing socket, a multi-input algorithm on a flat folder, or an
            output that would overwrite an input.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise InputError(f"{shown(input_dir)}: input folder not found")
    if (input_dir / "images").is_dir():
        cases = _grand_challenge_cases(input_dir, output_dir, sockets)
    else:
        cases = _flat_cases(input_dir, output_dir, sockets)
    _check_outputs_spare_inputs(cases)
    return cases

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
from gcinfer.errors import InputError
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
        raise InputError(f"{path}: not a Grand Challenge inputs.json ({error})") from None
    missing = [s for s in sockets.inputs if s not in listed]
    if missing:
        raise InputError(f"{path}: socket(s) {', '.join(missing)} not listed (has: {', '.join(sorted(listed))})")


def _grand_challenge_cases(input_dir: Path, output_dir: Path, sockets: Sockets) -> list[Case]:
    _check_inputs_json(input_dir, sockets)
    per_socket: dict[str, list[Path]] = {}
    for socket in sockets.inputs:
        folder = input_dir / "images" / socket
        files = _images_in(folder) if folder.is_dir() else []
        if not files:
            raise InputError(f"{folder}: no image for input socket '{socket}'")
        per_socket[socket] = files
    out_folder = output_dir / "images" / sockets.output
    first, *_others = sockets.inputs
    if all(len(files) == 1 for files in per_socket.values()):
        name = case_name(per_socket[first][0])
        inputs = {s: files[0] for s, files in per_socket.items()}
        return [Case(name, inputs, out_folder / f"{name}.mha")]
    by_name = {s: {case_name(p): p for p in files} for s, files in per_socket.items()}
    names = sorted(set().union(*(set(d) for d in by_name.values())))
    cases = []
    for name in names:
        inputs = {s: by_name[s][name] for s in sockets.inputs if name in by_name[s]}
        missing = [s for s in sockets.inputs if s not in inputs]
        error = None
        if missing:
            have = ", ".join(str(p) for p in inputs.values())
            error = f"{have}: no matching image named '{name}' in socket(s) {', '.join(missing)}"
        cases.append(Case(name, inputs, out_folder / f"{name}.mha", error))
    return cases


def _flat_cases(input_dir: Path, output_dir: Path, sockets: Sockets) -> list[Case]:
    if len(sockets.inputs) != 1:
        raise InputError(
            f"{input_dir}: a flat folder of images only serves single-input algorithms; "
            f"use the Grand Challenge layout images/<socket>/ for sockets {', '.join(sockets.inputs)}"
        )
    files = _images_in(input_dir)
    if not files:
        raise InputError(f"{input_dir}: no .mha, .nii or .nii.gz image found")
    return [Case(case_name(p), {sockets.inputs[0]: p}, output_dir / p.name) for p in files]


def discover_cases(input_dir: Path | str, output_dir: Path | str, sockets: Sockets) -> list[Case]:
    """List the cases of ``input_dir``.

    The Grand Challenge layout is used when ``input_dir/images`` exists, else the flat layout.

    Raises:
        InputError: missing or empty input folder, missing socket, or a multi-input algorithm on a flat folder.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: input folder not found")
    if (input_dir / "images").is_dir():
        return _grand_challenge_cases(input_dir, output_dir, sockets)
    return _flat_cases(input_dir, output_dir, sockets)

"""Configuration as data: reading the JSON files (container ``config.json``, ``model.json``, ``inputs.json``) and the
parts every pipeline shares (its sockets), each parsed once, behind typed objects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcinfer.errors import InputError, shown


@dataclass(frozen=True)
class Sockets:
    """The algorithm's interfaces: input socket slugs (folder names under ``images/``) and the output socket."""

    inputs: tuple[str, ...]
    output: str

    @classmethod
    def of(cls, config: dict, source: str | Path) -> Sockets:
        """The ``"sockets": {"inputs": [...], "output": "..."}`` entry of a pipeline configuration.

        Raises:
            InputError: missing or malformed (names ``source``).
        """
        try:
            entry = config["sockets"]
            inputs, output = entry["inputs"], entry["output"]
        except (KeyError, TypeError) as error:
            raise InputError(f"{shown(source)}: missing or malformed 'sockets' entry ({error!r})") from None
        if isinstance(inputs, str) or not all(isinstance(s, str) and s for s in inputs) or not inputs:
            raise InputError(
                f"{shown(source)}: 'sockets.inputs' must be a non-empty list of socket slugs, got {inputs!r}"
            )
        if not isinstance(output, str) or not output:
            raise InputError(f"{shown(source)}: 'sockets.output' must be a socket slug, got {output!r}")
        return cls(tuple(inputs), output)


def read_json(path: Path | str, expect: type = dict) -> Any:
    """The JSON value of ``path``, which must be of type ``expect`` (an object by default).

    Raises:
        InputError: unreadable, not JSON, too deeply nested, or not of type ``expect`` (names ``path``).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise InputError(f"{shown(path)}: cannot read JSON ({type(error).__name__}: {error})") from None
    if not isinstance(data, expect):
        raise InputError(f"{shown(path)}: expected a JSON {'object' if expect is dict else expect.__name__}")
    return data


def find_default_config(container: str, start: Path | None = None) -> Path | None:
    """``docker/<container>/config.json`` of the source checkout around ``start`` (default: the working folder),
    looked up as git finds its repository: in ``start`` and each parent. None outside a checkout (containers pass
    ``--config``)."""
    folder = (start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        path = candidate / "docker" / container / "config.json"
        if path.is_file():
            return path
    return None

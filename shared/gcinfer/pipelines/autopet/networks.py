"""The AutoPET II networks: MONAI DynUNets restored from MONAI ``CheckpointSaver`` files, checked key by key."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gcinfer.errors import DESERIALIZATION_ERRORS, InputError, cause_of, shown
from gcinfer.pipelines.autopet.settings import Settings

log = logging.getLogger(__name__)


FOLDS_OR_SINGLE = "checkpoint.pt"
"""The single checkpoint used when the model folder has no numbered folds (``0.pt``, ``1.pt``, ...)."""


def find_checkpoints(model_dir: Path, names: Sequence[str] | None = None) -> list[Path]:
    """The checkpoints to ensemble: ``names`` in ``model_dir``; else the numbered folds there (``0.pt``, ``1.pt``,
    ... in numeric order), or :data:`FOLDS_OR_SINGLE` when there are none, never both. Hidden files (``._0.pt``, as
    macOS leaves them) are not checkpoints. The choice and the files left out are logged.

    Raises:
        InputError: a named checkpoint is missing, or no numbered fold nor ``checkpoint.pt`` (the message lists what
            the folder holds).
    """
    model_dir = Path(model_dir)
    if names:
        paths = [model_dir / name for name in names]
        missing = [shown(p) for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{', '.join(missing)}: checkpoint not found")
        return paths
    found = sorted(p for p in model_dir.glob("*.pt") if p.is_file() and not p.name.startswith("."))
    folds = sorted((p for p in found if p.stem.isdigit()), key=lambda p: int(p.stem))
    single = [p for p in found if p.name == FOLDS_OR_SINGLE]
    chosen = folds or single
    if not chosen:
        listed = ", ".join(shown(p.name) for p in found) or "none"
        raise InputError(
            f"{shown(model_dir)}: no *.pt checkpoint to use (expected 0.pt ... 4.pt or checkpoint.pt; "
            f"found: {listed}); name them with --checkpoints"
        )
    left_out = [shown(p.name) for p in found if p not in chosen]
    kind = "numbered folds" if folds else "the single checkpoint"
    log.info(
        "%s: using %s %s%s",
        shown(model_dir),
        kind,
        ", ".join(p.name for p in chosen),
        f" (ignored: {', '.join(left_out)})" if left_out else "",
    )
    return chosen


def build_network(settings: Settings) -> nn.Module:
    """The DynUNet of ``settings.network`` (MONAI's implementation), in eval mode."""
    from monai.networks.nets import DynUNet

    try:
        return DynUNet(**settings.network).eval()
    except (TypeError, ValueError, AssertionError) as error:
        raise InputError(f"invalid DynUNet arguments {settings.network}: {error}") from None


def _aliases(network: nn.Module) -> dict[str, str]:
    """State-dict key -> the first key naming the same tensor (DynUNet repeats its blocks under ``skip_layers``)."""
    first: dict[int, str] = {}
    return {key: first.setdefault(id(tensor), key) for key, tensor in network.state_dict(keep_vars=True).items()}


def _summarize_keys(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def checked_state_dict(path: Path, network: nn.Module) -> dict[str, torch.Tensor]:
    """The ``"net"`` state dict of a MONAI CheckpointSaver file, completed over DynUNet's aliased keys.

    A tensor stored under any of its aliases (e.g. ``skip_layers.*`` or ``input_block.*``) serves all of them.

    Raises:
        InputError: unreadable file, no ``"net"`` dict, missing, unexpected or wrongly shaped keys (named).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except DESERIALIZATION_ERRORS as error:
        raise InputError(f"{shown(path)}: cannot read checkpoint ({cause_of(error)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("net"), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputError(f"{shown(path)}: expected a MONAI checkpoint {{'net': state_dict}}, found keys {found}")
    stored = checkpoint["net"]
    aliases = _aliases(network)
    expected = network.state_dict()
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise InputError(f"{shown(path)}: unexpected key(s) in 'net': {_summarize_keys(unexpected)}")
    by_group = {aliases[key]: value for key, value in stored.items()}
    missing = sorted(set(aliases.values()) - set(by_group))
    if missing:
        raise InputError(f"{shown(path)}: missing key(s) in 'net': {_summarize_keys(missing)}")
    complete = {key: by_group[aliases[key]] for key in expected}
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in complete.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        shapes = _summarize_keys(wrong)
        raise InputError(f"{shown(path)}: wrongly shaped tensor(s) in 'net' (checkpoint != network): {shapes}")
    return complete


def load_networks(paths: Sequence[Path], settings: Settings, device: torch.device) -> list[nn.Module]:
    """One DynUNet per checkpoint, weights loaded and checked, in eval mode on ``device``."""
    networks = []
    for path in paths:
        network = build_network(settings)
        network.load_state_dict(checked_state_dict(path, network))
        networks.append(network.to(device).eval())
    return networks

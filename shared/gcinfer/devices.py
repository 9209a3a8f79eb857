"""Device handling in one place: choosing the device and reading peak memory."""

from __future__ import annotations

import os
import resource

import torch

from gcinfer.errors import UsageError


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch device for ``name``; None or ``"auto"`` means cuda when available, else cpu.

    Raises:
        UsageError: not a device name, or a cuda device is asked for but CUDA is not available.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' requested but CUDA is not available here (use --device cpu)")
    return device


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """fp16 autocast on CUDA (as the reference submissions ran), none elsewhere."""
    return torch.float16 if device.type == "cuda" else None


def use_deterministic_algorithms(device: torch.device) -> None:
    """Make predictions on ``device`` repeatable: the same input gives byte-identical outputs.

    cuDNN's autotuner off (nnU-Net v1's trainer switches it on when it is built) and deterministic kernels where
    PyTorch has them (a warning, not an error, for ops without one; cuBLAS gets the workspace setting it needs, before
    its first use). CPU kernels are deterministic already for a fixed thread count.
    """
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_bytes(device: torch.device) -> int | None:
    """Peak memory allocated by torch on a CUDA ``device`` since the last reset, else None."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


def reset_peak_device_bytes(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

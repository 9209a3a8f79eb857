"""Memory budgets: what the operating system and the device leave for a case (the probes of the planner).

The host's budget is the smallest cgroup memory limit along the process's own cgroup (the container's ``--memory``,
a pod's or a systemd slice's limit) when there is one, else the physical memory, minus what the process already
holds and a margin, and at most what the process's rlimits on virtual memory leave: ``RLIMIT_DATA`` (which Grand
Challenge's runtime sets from the job's memory limit) and ``RLIMIT_AS`` (``ulimit -v``); the device's is its free
memory plus PyTorch's cached free blocks, minus a margin for cuDNN workspaces and fragmentation. Tests and the
benchmark pass budgets explicitly, e.g. :data:`T4_FREE_BYTES`.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
T4_FREE_BYTES = (15360 - 600) * 2**20
"""A T4 as Grand Challenge's instances report it (15,360 MiB) minus ~600 MiB of CUDA context and cuDNN kernels."""
HOST_MARGIN_BYTES = 512 * 2**20
"""Kept free on the host: allocator fragmentation, library buffers, thread stacks."""
VIRTUAL_MARGIN_BYTES = 512 * 2**20
"""Kept free under ``RLIMIT_DATA`` and ``RLIMIT_AS``: the planner models resident memory, but these limits count
mapped memory, which grows beyond the resident during a case (allocator arenas, freed blocks not yet unmapped,
thread stacks). ``benchmarks/bench_memory.py`` prints that gap for the full-size cases; this is a multiple of it."""
DEVICE_MARGIN = 0.08
"""Fraction of the device budget kept free: cuDNN workspaces and the caching allocator's fragmentation."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read_limit(path: Path) -> int | None:
    """A cgroup memory limit file's value in bytes; None when absent, unreadable or unlimited (``max``)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def own_cgroups(proc_cgroup: Path = PROC_CGROUP) -> tuple[str | None, str | None]:
    """This process's cgroup paths from ``/proc/self/cgroup``: (v2 unified path, v1 memory controller path), each None
    when absent (``0::/kubepods/pod1`` and ``4:memory:/docker/abc`` lines)."""
    unified = memory = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            memory = path
    return unified, memory


def _along(folder: Path, path: str | None) -> list[Path]:
    """``folder`` / each prefix of the cgroup ``path``, root first (``/a/b`` -> ``folder``, ``folder/a``,
    ``folder/a/b``); only ``folder`` when the path is unknown."""
    parts = [p for p in (path or "").split("/") if p and p not in (".", "..")]
    return [folder.joinpath(*parts[:depth]) for depth in range(len(parts) + 1)]


def host_limit_bytes(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The process's memory limit: the smallest cgroup limit along its own cgroup's path (``/proc/self/cgroup``),
    from the hierarchy's root down (v2 ``memory.max``, v1 ``memory/<path>/memory.limit_in_bytes``; a container sees
    its own cgroup as the root, a process in a sub-cgroup of a host or a pod has its limit further down), at most the
    physical memory."""
    unified, memory = own_cgroups(proc_cgroup)
    files = [folder / "memory.max" for folder in _along(cgroup_root, unified)]
    files += [folder / "memory.limit_in_bytes" for folder in _along(cgroup_root / "memory", memory)]
    limits = [limit for limit in map(_read_limit, files) if limit is not None]
    return min([physical_memory_bytes(), *limits])


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmSize``) in bytes."""
    with open("/proc/self/status") as status:
        return next((int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:")), 0)


def rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``)."""
    return status_bytes("VmRSS")


def virtual_memory_left_bytes() -> int | None:
    """What this process may still map under its rlimits, less :data:`VIRTUAL_MARGIN_BYTES`: ``RLIMIT_DATA``
    (private writable memory, ``VmData``; Grand Challenge's runtime sets it to the job's memory limit) and
    ``RLIMIT_AS`` (all mappings, ``VmSize``; ``ulimit -v``). None when neither is set."""
    left = []
    for limit, field in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft, _ = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY:
            left.append(soft - status_bytes(field) - VIRTUAL_MARGIN_BYTES)
    return min(left, default=None)


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA ``device`` (driver's free memory plus PyTorch's cached free blocks); None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass(frozen=True)
class Budget:
    """Bytes a case may still use, after what the process already holds.

    Attributes:
        device: on the device; None when the device is the CPU (device buffers then live on the host).
        host: on the host.
    """

    device: int | None
    host: int

    @classmethod
    def detect(
        cls, device: torch.device, held_bytes: int = 0, device_bytes: int | None = None, host_bytes: int | None = None
    ) -> Budget:
        """The budget of ``device`` and this host now.

        Args:
            held_bytes: host memory the process holds now that the model counts itself (e.g. the image just read).
            device_bytes, host_bytes: override the detection (before the margins), e.g. :data:`T4_FREE_BYTES`.
        """
        if host_bytes is None:
            left = [host_limit_bytes() - rss_bytes(), virtual_memory_left_bytes()]
            host_bytes = min(x for x in left if x is not None) + held_bytes - HOST_MARGIN_BYTES
        if device_bytes is None:
            device_bytes = device_free_bytes(device)
        if device_bytes is not None:
            device_bytes = int(device_bytes * (1 - DEVICE_MARGIN))
        return cls(device_bytes, max(int(host_bytes), 0))

    @property
    def shared(self) -> bool:
        """Device and host are the same memory (CPU device)."""
        return self.device is None

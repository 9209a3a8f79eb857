"""Memory planning: before a case is predicted, what its buffers need, and where (device or host) and in which
dtype they fit.

Grand Challenge's GPU instance has a T4 (16 GB) and 15 GiB of RAM for the container; exceeding the RAM kills the
container (exit code 137) and the case is lost. The planner is split as its concerns are:

- :mod:`~gcinfer.memory.budget`: what the operating system and the device leave (cgroup, rlimits, CUDA);
- :mod:`~gcinfer.memory.model`: buffers, phases, the choices of dtype and placement, and the plan (pure);
- :mod:`~gcinfer.memory.network`: a network's weights and the activations of a forward pass;
- :mod:`~gcinfer.memory.tiling`: the phases of one tiled prediction.

Each pipeline models its own phases next to its code (``gcinfer.pipelines.amos.memory``,
``gcinfer.pipelines.autopet.memory``).
"""

from gcinfer.memory.budget import DEVICE_MARGIN, GIB, HOST_MARGIN_BYTES, T4_FREE_BYTES, VIRTUAL_MARGIN_BYTES, Budget
from gcinfer.memory.model import (
    REDUCED_DTYPE,
    Buffer,
    Choice,
    Estimate,
    MemoryPlanError,
    Phase,
    Plan,
    candidates,
    choose,
    estimate,
)
from gcinfer.memory.network import NetworkCost, network_cost, peak_tensor_bytes
from gcinfer.memory.tiling import Tiling, tiling_phases

__all__ = [
    "DEVICE_MARGIN",
    "GIB",
    "HOST_MARGIN_BYTES",
    "REDUCED_DTYPE",
    "T4_FREE_BYTES",
    "VIRTUAL_MARGIN_BYTES",
    "Budget",
    "Buffer",
    "Choice",
    "Estimate",
    "MemoryPlanError",
    "NetworkCost",
    "Phase",
    "Plan",
    "Tiling",
    "candidates",
    "choose",
    "estimate",
    "network_cost",
    "peak_tensor_bytes",
    "tiling_phases",
]

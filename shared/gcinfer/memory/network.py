"""Device memory of a network: its weights, and the activations of one forward pass measured on the ``meta``
device (no memory, no compute)."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveTensorBytes(TorchDispatchMode):
    """Records the peak of the bytes of tensor storages created under it and still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage id -> [bytes, tensors referencing it]
        self.current = self.peak = 0

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self.live.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                key = tensor.untyped_storage()._cdata
                if key in self.live or key not in inputs:  # not a view of (or the same as) a tensor made before
                    self._track(tensor)
        return out


def peak_tensor_bytes(function: Callable[[], object]) -> int:
    """Peak bytes of the tensors ``function`` creates and holds at once (inputs created before it not counted)."""
    mode = _LiveTensorBytes()
    with mode:
        function()
    return mode.peak


@dataclass(frozen=True)
class NetworkCost:
    """Device memory of one network.

    Attributes:
        weights: parameters and buffers as stored (bytes).
        activations: peak of the tensors one forward pass of a single tile creates (output included), in the
            compute dtype; a batch of ``B`` tiles needs ``B`` times as much.
        autocast_cache: the half-precision weight copies autocast keeps during a forward pass (0 without).
    """

    weights: int
    activations: int
    autocast_cache: int

    def forward(self, tile_batch_size: int) -> int:
        """Bytes one forward pass of ``tile_batch_size`` tiles adds to the weights."""
        return self.activations * tile_batch_size + self.autocast_cache


def _meta_copy(network: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``network`` whose parameters and floating buffers are ``meta`` tensors of ``dtype`` (its real
    tensors are not copied: they are mapped to their stand-ins in ``deepcopy``'s memo; shared ones stay shared)."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in (*network.parameters(), *network.buffers()):
        stand_in = torch.empty_like(tensor, device="meta", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        memo[id(tensor)] = torch.nn.Parameter(stand_in, False) if isinstance(tensor, torch.nn.Parameter) else stand_in
    return copy.deepcopy(network, memo)


def network_cost(network: torch.nn.Module, tile_shape: Sequence[int], compute_dtype: torch.dtype | None) -> NetworkCost:
    """Measure ``network`` (in eval mode) for ``(C, *patch)`` tiles, computing in ``compute_dtype`` (None: float32).

    A ``meta`` copy of the network runs once (no memory, no compute; the network itself is untouched); autocast is
    modelled by a copy in ``compute_dtype``.
    """
    parameters = list(network.parameters())
    weights = sum(t.numel() * t.element_size() for t in (*parameters, *network.buffers()))
    dtype = compute_dtype or torch.float32
    meta, tile = _meta_copy(network, dtype), torch.empty((1, *tile_shape), device="meta", dtype=dtype)
    with torch.inference_mode():
        activations = peak_tensor_bytes(lambda: meta(tile))
    cache = sum(p.numel() for p in parameters) * dtype.itemsize if compute_dtype is not None else 0
    return NetworkCost(weights, activations, cache)

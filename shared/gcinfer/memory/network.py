"""Device memory of a network: its weights, and the activations of one forward pass.

The activations are measured without computing the network: its convolutions and normalisations are replaced by
stand-ins that only allocate their output (:func:`shape_copy`), and that copy runs on a proportionally reduced tile
whose bytes scale to the full tile (:func:`reduced_tile`). Networks for which no such tile is found run once on the
``meta`` device instead, whose first use imports ``torch._dynamo`` (about a second per process).
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveTensorBytes(TorchDispatchMode):
    """Records the peak of the bytes of tensor storages created under it and still referenced."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Do not wrap ``__torch_dispatch__`` in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo``
        (about a second per process) for nothing: nothing here is compiled."""
        return False

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

    The peak of the tensors one forward pass holds at once (:func:`peak_tensor_bytes`), in the network's dtype, on
    the :func:`reduced_tile` of its :func:`shape_copy`, times the ratio of voxels and of the dtypes' sizes; when
    there is no reduced tile, a ``meta`` copy in ``compute_dtype`` runs on the full tile. The network itself is
    untouched. Autocast is modelled as computing in ``compute_dtype`` throughout; its weight copies are
    :attr:`NetworkCost.autocast_cache`.
    """
    parameters = list(network.parameters())
    weights = sum(t.numel() * t.element_size() for t in (*parameters, *network.buffers()))
    dtype = compute_dtype or torch.float32
    reduced = reduced_tile(shape_copy(network), tile_shape)
    if reduced is None:
        meta, tile = _meta_copy(network, dtype), torch.empty((1, *tile_shape), device="meta", dtype=dtype)
        with torch.inference_mode():
            activations = peak_tensor_bytes(lambda: meta(tile))
    else:
        shape, peak = reduced
        voxels = math.prod(tile_shape[1:]) // math.prod(shape[1:])
        activations = peak * voxels * dtype.itemsize // _input_options(network)["dtype"].itemsize
    cache = sum(p.numel() for p in parameters) * dtype.itemsize if compute_dtype is not None else 0
    return NetworkCost(weights, activations, cache)


def shape_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` sharing its tensors, whose convolutions and normalisations (the modules that cost
    compute, or that need more than one voxel) only allocate their output, of the real shape, dtype and device, zero
    filled (uninitialised memory may hold denormals, slow for the activations that follow): the same tensors at the
    dispatch level, without the arithmetic."""
    copied = copy.deepcopy(network, {id(t): t for t in (*network.parameters(), *network.buffers())})
    for module in copied.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            module.forward = functools.partial(_convolution_output, module)
        elif isinstance(module, _NORMALISATIONS):
            module.forward = torch.zeros_like
    return copied


def _convolution_output(module: torch.nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """A zero tensor of the shape ``module(x)`` has (PyTorch's output size formulas)."""
    sizes = []
    for axis, n in enumerate(x.shape[2:]):
        k, s, d = module.kernel_size[axis], module.stride[axis], module.dilation[axis]
        if module.transposed:
            p = module.padding[axis]
            sizes.append((n - 1) * s - 2 * p + d * (k - 1) + module.output_padding[axis] + 1)
        elif module.padding == "same":
            sizes.append(n)
        else:
            p = 0 if module.padding == "valid" else module.padding[axis]
            sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return x.new_zeros((x.shape[0], module.out_channels, *sizes))


def reduced_tile(network: torch.nn.Module, tile_shape: Sequence[int]) -> tuple[tuple[int, ...], int] | None:
    """A small ``(C, *reduced)`` tile, each reduced extent a power of two dividing the patch's, on which
    ``network`` downsamples and upsamples exactly as on ``tile_shape``, and the peak live tensor bytes of its forward
    pass there (:func:`peak_tensor_bytes`, in the network's dtype); None when there is no such tile.

    Exact means: every convolution and pooling module's output extent times its stride is its input extent
    (transposed convolutions: input times stride), and the network's output has the tile's spatial shape; then every
    spatial shape of the forward pass scales with the tile, and so does every tensor but those without spatial axes
    (statistics, a few bytes), which the scaled peak over-counts. Found by forward passes on tiny tiles, doubling the
    extent of the axes where a module breaks that rule (of every axis when the pass fails before); meant for a
    :func:`shape_copy`, whose passes cost no arithmetic.
    """
    channels, patch = int(tile_shape[0]), [int(p) for p in tile_shape[1:]]
    reduced = [1] * len(patch)
    while True:
        broken, peak = _probe(network, (channels, *reduced))
        if not broken:
            return (channels, *reduced), peak
        if any(patch[axis] % (2 * reduced[axis]) for axis in broken):
            return None
        for axis in broken:
            reduced[axis] *= 2


def _input_options(network: torch.nn.Module) -> dict:
    """The device and dtype of the network's first parameter (the CPU and float32 without parameters)."""
    parameter = next(network.parameters(), None)
    return {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {"dtype": torch.float32}


def _probe(network: torch.nn.Module, tile_shape: tuple[int, ...]) -> tuple[set[int], int]:
    """A forward pass on ``tile_shape``: the spatial axes along which it does not scale (see :func:`reduced_tile`;
    when the pass fails, those found before, else all) and its peak live tensor bytes."""
    broken: set[int] = set()
    spatial = len(tile_shape) - 1

    def check(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        if not (isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor)):
            return
        stride = getattr(module, "stride", None) or module.kernel_size
        strides = (stride,) * spatial if isinstance(stride, int) else tuple(stride)
        transposed = getattr(module, "transposed", False)
        for axis, (n_in, n_out, s) in enumerate(zip(inputs[0].shape[-spatial:], output.shape[-spatial:], strides)):
            if (n_out != n_in * s) if transposed else (n_out * s != n_in):
                broken.add(axis)

    outputs = []
    handles = [m.register_forward_hook(check) for m in network.modules() if isinstance(m, _STRIDED)]
    tile = torch.zeros((1, *tile_shape), **_input_options(network))
    try:
        with torch.inference_mode():
            peak = peak_tensor_bytes(lambda: outputs.append(network(tile)))
    except (RuntimeError, ValueError):  # shapes that do not fit (concatenations): the axes found so far, else all
        return broken or set(range(spatial)), 0
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(outputs[0], torch.Tensor) or tuple(outputs[0].shape[2:]) != tuple(tile_shape[1:]):
        broken.update(range(spatial))
    return broken, peak


_STRIDED = (torch.nn.modules.conv._ConvNd, torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd)
_NORMALISATIONS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)

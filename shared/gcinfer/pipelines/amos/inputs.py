"""The configurations' network inputs of one case: each distinct preprocessing computed once, the next one on the
host while the current configuration predicts.

nnU-Net v1's preprocessing (float64 third-order spline resampling of the crop, then normalisation) is the largest host
cost of an AMOS case, and the AMOS ensembles hold configurations that preprocess a CT identically: task 1's
``bfnnUNet_fabresnet_31_bs5`` and ``bfnnUNet_fabresnet_bs5`` plans share their target spacing, axis order and CT
normalisation, and their preprocessor classes (``Preprocessor3DBetterResampling``, ``GenericPreprocessor``) resample
the image with the same third-order spline whenever ``GenericPreprocessor`` does not resample z apart.
Configurations whose :func:`preprocessing_of` is equal (and not None) get the same array: byte for byte what each
would have computed (tested against nnU-Net's own ``resample_and_normalize``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gcinfer.background import Background

if TYPE_CHECKING:
    from gcinfer.pipelines.amos.nnunet_v1 import Configuration, Cropped

_ALWAYS_3D = "nnunet.preprocessing.preprocessing.Preprocessor3DBetterResampling"
_DYNAMIC_Z = "nnunet.preprocessing.preprocessing.GenericPreprocessor"


def _anisotropic(spacing: Sequence[float], threshold: float) -> bool:
    return max(spacing) / min(spacing) > threshold


def _data_resampling_order(preprocessor: object, spacing_zyx: Sequence[float], target: Sequence[float]) -> int | None:
    """The spline order of nnU-Net v1's resampling of the image when it is one 3D resampling, None otherwise (z
    resampled apart, or a preprocessor class whose resampling this module does not know)."""
    name = f"{type(preprocessor).__module__}.{type(preprocessor).__qualname__}"
    if name == _ALWAYS_3D:
        return 3
    if name == _DYNAMIC_Z:
        threshold = preprocessor.resample_separate_z_anisotropy_threshold
        if _anisotropic(spacing_zyx, threshold) or _anisotropic(target, threshold):
            return None
        return int(preprocessor.resample_order_data)
    return None


def preprocessing_of(configuration: Configuration, spacing_zyx: Sequence[float], channels: int) -> tuple | None:
    """What determines ``configuration.preprocess`` of a case of spacing ``spacing_zyx`` (z, y, x, mm) with
    ``channels`` channels, as a comparable tuple: the image's resampling (spline order, target spacing, axis order)
    and the normalisation (schemes, masks, intensity properties). None when it depends on more than that: a
    normalisation that reads the resampled non-zero mask, z resampled apart, an unknown preprocessor class."""
    preprocessor = configuration.preprocessor
    if configuration.normalisation_reads_mask(channels):
        return None
    target = tuple(float(s) for s in configuration.target_spacing)
    order = _data_resampling_order(preprocessor, spacing_zyx, target)
    if order is None:
        return None
    return (
        order,
        target,
        tuple(configuration.transpose_forward),
        tuple(preprocessor.normalization_scheme_per_modality[c] for c in range(channels)),
        tuple(bool(preprocessor.use_nonzero_mask[c]) for c in range(channels)),
        repr(preprocessor.intensityproperties),
    )


def input_sources(configurations: Sequence[Configuration], spacing_zyx: Sequence[float], channels: int) -> list[int]:
    """Per configuration, in order: the index of the configuration whose network input it takes, the first one with
    an equal :func:`preprocessing_of` (not None); its own index when it needs its own preprocessing."""
    keys = [preprocessing_of(c, spacing_zyx, channels) for c in configurations]
    return [
        next(j for j, other in enumerate(keys) if j == i or (key is not None and other == key))
        for i, key in enumerate(keys)
    ]


class NetworkInputs:
    """The network inputs of ``configurations`` for one crop, handed out in prediction order by :meth:`take`.

    A configuration whose :func:`input_sources` entry is an earlier configuration gets that one's array again (kept
    until its last user has taken it). With ``overlap``, taking configuration ``k``'s input starts the preprocessing
    of the next configuration that needs its own on a background thread, so that it runs while ``k`` predicts (numpy
    and scipy release the GIL in their loops); at most one preprocessing runs at a time.
    """

    def __init__(self, cropped: Cropped, configurations: Sequence[Configuration], overlap: bool) -> None:
        self._cropped = cropped
        self._configurations = list(configurations)
        self._sources = input_sources(configurations, cropped.properties["original_spacing"], len(cropped.data))
        self._overlap = overlap
        self._next: tuple[int, Background[np.ndarray]] | None = None
        self._kept: dict[int, np.ndarray] = {}

    def __enter__(self) -> NetworkInputs:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        """Wait for a background preprocessing still running when the case ends early on an error, so that it does
        not compete with the next case; on an interruption (SIGTERM, Ctrl-C) it is abandoned (its thread is a
        daemon)."""
        pending, self._next = self._next, None
        self._kept.clear()
        if pending is not None and (kind is None or issubclass(kind, Exception)):
            with contextlib.suppress(Exception):
                pending[1].result()

    def _preprocess(self, index: int) -> np.ndarray:
        return self._configurations[index].preprocess(self._cropped).data

    def take(self, index: int) -> np.ndarray:
        """Configuration ``index``'s network input, ``(C, *transposed spatial)`` float32 (see
        :class:`~gcinfer.pipelines.amos.nnunet_v1.Preprocessed`). Indices must come in order, each once."""
        source = self._sources[index]
        if source != index:
            data = self._kept[source]
        elif self._next is not None and self._next[0] == index:
            data, self._next = self._next[1].result(), None
        else:
            data = self._preprocess(index)
        later = self._sources[index + 1 :]
        if source in later:
            self._kept[source] = data
        else:
            self._kept.pop(source, None)
        upcoming = next((j for j in range(index + 1, len(self._sources)) if self._sources[j] == j), None)
        if self._overlap and upcoming is not None and self._next is None:
            self._next = (upcoming, Background(lambda: self._preprocess(upcoming), f"preprocess {upcoming}"))
        return data

"""Reading nnU-Net v1's pickles (``fold_k/<checkpoint>.model.pkl``, ``plans.pkl``) without running their code.

A pickle may call any importable function while it loads: a model folder would run code. nnU-Net v1 writes only
plain data there (dicts, lists, tuples, strings, numbers, ``OrderedDict``, numpy arrays, scalars and dtypes), so
:class:`RestrictedUnpickler` resolves only those globals and refuses any other, naming it. Every failure of reading
a pickle (or a checkpoint, :data:`DESERIALIZATION_ERRORS`) is reported as the file's, never as a traceback.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gcinfer.errors import DESERIALIZATION_ERRORS, InputError, cause_of, shown

_DTYPE_KINDS = "biufcSU"
"""numpy dtype kinds read (booleans, integers, floats, complex, strings); no object, void or structured dtypes."""


class _Dtype:
    """Stands for ``numpy.dtype(spec, align, copy)`` while unpickling: the spec must be a plain dtype string; the
    pickle's state may only set the byte order."""

    def __init__(self, spec: object, align: object = False, copy: object = False) -> None:
        if not isinstance(spec, str) or len(spec) > 8:
            raise pickle.UnpicklingError(f"dtype spec {spec!r:.40} is not a plain dtype name")
        self.dtype = np.dtype(spec)
        if self.dtype.kind not in _DTYPE_KINDS or self.dtype.names is not None or self.dtype.itemsize > 64:
            raise pickle.UnpicklingError(f"dtype {self.dtype} is not plain data")

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("malformed dtype state")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


class _Array:
    """Stands for ``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`` while unpickling; the pickle's
    state ``(version, shape, dtype, fortran, raw bytes)`` is checked and the array built with ``numpy.frombuffer``,
    never by numpy's own ``__setstate__``."""

    def __init__(self, cls: object, shape: object, typecode: object) -> None:
        if cls is not np.ndarray:
            raise pickle.UnpicklingError("only numpy.ndarray is reconstructed")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("malformed ndarray state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes) or not isinstance(fortran, bool):
            raise pickle.UnpicklingError("malformed ndarray state (dtype, data or order)")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and 0 <= n < 2**40 for n in shape):
            raise pickle.UnpicklingError(f"malformed ndarray shape {shape!r:.60}")
        if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
            raise pickle.UnpicklingError(f"ndarray data of {len(raw)} bytes for shape {shape} of {dtype.dtype}")
        flat = np.frombuffer(raw, dtype.dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C").copy()


def _scalar(dtype: object, raw: object) -> np.generic:
    """``numpy.core.multiarray.scalar(dtype, raw bytes)``, checked."""
    if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar")
    return np.frombuffer(raw, dtype.dtype)[0]


_NUMPY_MODULES = ("numpy.core", "numpy._core")  # numpy < 2 and numpy 2 names of the same functions
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _Dtype,
    **{(f"{m}.multiarray", "_reconstruct"): _Array for m in _NUMPY_MODULES},
    **{(f"{m}.multiarray", "scalar"): _scalar for m in _NUMPY_MODULES},
}
"""The globals nnU-Net v1's pickles refer to: ``(module, name)`` -> what stands for it (numpy's own constructors,
given corrupt arguments, can crash the process: they are replaced by checked ones)."""


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`.

    It is Python's own pure-Python unpickler: the C one keeps its memo as an array that a corrupt ``LONG_BINPUT``
    index grows to tens of GiB (the process is killed); here the memo is a dict. nnU-Net's pickles are small."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}, which nnU-Net v1 does not write there (only dicts, OrderedDict, numpy "
                "arrays, scalars and dtypes are read)"
            ) from None


def _resolved(value: Any) -> Any:
    """``value`` with the stand-ins replaced by the numpy arrays and dtypes they built, in containers too."""
    if isinstance(value, _Array):
        if value.array is None:
            raise pickle.UnpicklingError("an ndarray without its data")
        return value.array
    if isinstance(value, _Dtype):
        return value.dtype
    if isinstance(value, dict):
        return type(value)((_resolved(k), _resolved(v)) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_resolved(v) for v in value)
    return value


def load_pickle(path: Path) -> Any:
    """The content of the nnU-Net v1 pickle ``path``, read with :class:`RestrictedUnpickler`.

    Raises:
        InputError: unreadable, corrupt, or referring to anything but plain data; names the file and the cause.
    """
    try:
        with open(path, "rb") as stream:
            return _resolved(RestrictedUnpickler(stream).load())
    except DESERIALIZATION_ERRORS as error:
        raise InputError(f"{shown(path)}: cannot read pickle ({cause_of(error)})") from None

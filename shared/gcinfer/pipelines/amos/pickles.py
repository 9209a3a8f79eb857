"""Reading nnU-Net v1's pickles (``fold_k/<checkpoint>.model.pkl``, ``plans.pkl``) without running their code.

A pickle may call any importable function while it loads: a model folder would run code. nnU-Net v1 writes only
plain data there (dicts, lists, tuples, strings, numbers, ``OrderedDict``, numpy arrays, scalars and dtypes), so
:class:`RestrictedUnpickler` resolves only those globals and refuses any other, naming it. Every failure of reading
a pickle (or a checkpoint, :data:`DESERIALIZATION_ERRORS`) is reported as the file's, never as a traceback.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gcinfer.errors import DESERIALIZATION_ERRORS, InputError, cause_of, shown

_NUMPY_MODULES = ("numpy.core", "numpy._core")  # numpy < 2 and numpy 2 names of the same functions
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{m}.multiarray", "_reconstruct"): np._core.multiarray._reconstruct for m in _NUMPY_MODULES},
    **{(f"{m}.multiarray", "scalar"): np._core.multiarray.scalar for m in _NUMPY_MODULES},
    **{(f"{m}.numeric", "_frombuffer"): np._core.numeric._frombuffer for m in _NUMPY_MODULES},
}
"""The globals nnU-Net v1's pickles refer to: ``(module, name)`` -> the object."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}, which nnU-Net v1 does not write there (only dicts, OrderedDict, numpy "
                "arrays, scalars and dtypes are read)"
            ) from None


def load_pickle(path: Path) -> Any:
    """The content of the nnU-Net v1 pickle ``path``, read with :class:`RestrictedUnpickler`.

    Raises:
        InputError: unreadable, corrupt, or referring to anything but plain data; names the file and the cause.
    """
    try:
        with open(path, "rb") as stream:
            return RestrictedUnpickler(stream).load()
    except DESERIALIZATION_ERRORS as error:
        raise InputError(f"{shown(path)}: cannot read pickle ({cause_of(error)})") from None

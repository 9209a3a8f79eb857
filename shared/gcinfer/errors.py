"""The library's own error types: what the runner reports as one failed case, naming the file and the cause; and
how a file name is shown in those messages and in log lines."""

from __future__ import annotations

import pickle
import unicodedata
from pathlib import Path

DESERIALIZATION_ERRORS = (
    OSError,
    EOFError,
    pickle.UnpicklingError,
    UnicodeDecodeError,
    TypeError,
    ValueError,
    OverflowError,
    IndexError,
    KeyError,
    AttributeError,
    ImportError,
    MemoryError,
    RecursionError,
    RuntimeError,
    SystemError,
)
"""What reading a corrupt or hostile pickle or checkpoint raises (``UnicodeDecodeError`` and ``OverflowError`` from
opcodes' arguments, ``TypeError`` from a reduce with wrong arguments, ``MemoryError`` from a huge length, ...)."""


class InputError(Exception):
    """A problem with one input, model or output file; the message names the file and the cause."""


class MemoryPlanError(InputError):
    """A case that cannot fit in memory with any choice; the message names the file and the sizes."""


class UsageError(Exception):
    """A command-line choice this machine cannot honour (e.g. ``--device cuda`` without CUDA); stops the run."""


def shown(path: Path | str) -> str:
    """``path`` as error messages and log lines show it: as is, unless it holds a control or format character (a
    newline in a file name could forge a log line; an undecodable byte is a surrogate), then quoted as a Python string
    literal, e.g. ``'/input/a\\nERROR b.mha'``."""
    text = str(path)
    return repr(text) if any(unicodedata.category(c).startswith("C") for c in text) else text


def cause_of(error: BaseException) -> str:
    """One line saying why reading a file failed: the line of a multi-line message that names a refused global
    (``torch.load(weights_only=True)`` explains its option first), else its first line, else the exception's type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if "GLOBAL" in line]
    return f"{type(error).__name__}: {(specific or lines or ['(no message)'])[0]}"

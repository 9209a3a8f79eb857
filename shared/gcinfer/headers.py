"""What the image files' own headers say, checked before ITK reads anything, where ITK would trust them:

- a MetaImage (``.mha``) header may point its voxels at any file (``ElementDataFile = /dev/zero``, a FIFO, another
  user's file): only ``ElementDataFile = LOCAL`` (the voxels follow the header in the same file) is accepted, and its
  ``DimSize`` must be positive integers whose product does not overflow;
- a NIfTI file (``.nii``, ``.nii.gz``) shorter than its header says is zero-filled by ITK without a word: the data's
  length must reach ``vox_offset + voxels x bytes per voxel``.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from gcinfer.errors import InputError, shown

METAIMAGE_HEADER_LIMIT = 1 << 16
"""Bytes of a MetaImage header read at most: real headers are a few hundred bytes of ``key = value`` lines."""
MAX_VOXEL_BYTES = 2**62
"""Voxel data larger than this overflows ITK's 64-bit sizes (``DimSize`` products); no machine holds it anyway."""
NIFTI_HEADER_BYTES = 540
"""Enough of a file's start for a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header."""
_METAIMAGE_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 8,
    "MET_ULONG": 8,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _bad_header(path: Path, cause: str) -> InputError:
    return InputError(f"{shown(path)}: cannot read image header ({cause})")


def metaimage_header(path: Path) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header up to and including ``ElementDataFile`` (keys as written).

    Raises:
        InputError: no ``ElementDataFile`` line within :data:`METAIMAGE_HEADER_LIMIT` bytes, a line that is not
            ``key = value`` text, voxels in another file than the header's, or an invalid or overflowing ``DimSize``.
    """
    with open(path, "rb") as stream:
        head = stream.read(METAIMAGE_HEADER_LIMIT)
    fields: dict[str, str] = {}
    for number, raw in enumerate(head.split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        key, equals, value = raw.rstrip(b"\r").partition(b"=")
        try:
            key_text, value_text = key.decode("ascii").strip(), value.decode("utf-8").strip()
        except UnicodeDecodeError:
            key_text = ""
        if not equals or not key_text.replace("_", "").isalnum():
            raise _bad_header(path, f"line {number} of the MetaImage header is not 'key = value'")
        fields[key_text] = value_text
        if key_text.lower() == "elementdatafile":
            _check_metaimage_fields(path, fields)
            return fields
    raise _bad_header(path, f"no ElementDataFile line in the first {METAIMAGE_HEADER_LIMIT} bytes of the header")


def _check_metaimage_fields(path: Path, fields: dict[str, str]) -> None:
    by_key = {key.lower(): value for key, value in fields.items()}
    data_file = by_key["elementdatafile"]
    if data_file.lower() != "local":
        raise InputError(
            f"{shown(path)}: the header reads its voxels from another file (ElementDataFile = {shown(data_file)}); "
            "only ElementDataFile = LOCAL (voxels in the .mha itself) is accepted"
        )
    dims_text = by_key.get("dimsize", "")
    try:
        dims = [int(d) for d in dims_text.split()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise _bad_header(path, f"invalid DimSize '{dims_text}' (positive integers expected)")
    channels = by_key.get("elementnumberofchannels", "1")
    element = _METAIMAGE_ELEMENT_BYTES.get(by_key.get("elementtype", ""), 8) * (
        int(channels) if channels.isdigit() else 1
    )
    if math.prod(dims) * element > MAX_VOXEL_BYTES:
        raise _bad_header(path, f"DimSize {dims_text} overflows: {math.prod(dims)} voxels")


def nifti_data_end(head: bytes) -> int | None:
    """The byte where a NIfTI file's voxel data ends by its header (``vox_offset + voxels x bitpix / 8``), from the
    file's first :data:`NIFTI_HEADER_BYTES` bytes; None when ``head`` is not a NIfTI-1/2 header whose sizes make sense
    (ITK then reports the problem itself)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(f"{endian}i", head[:4])[0] == 348:
            dims = struct.unpack(f"{endian}8h", head[40:56])
            bitpix = struct.unpack(f"{endian}h", head[72:74])[0]
            offset = struct.unpack(f"{endian}f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(f"{endian}i", head[:4])[0] == 540:
            bitpix = struct.unpack(f"{endian}h", head[14:16])[0]
            dims = struct.unpack(f"{endian}8q", head[16:80])
            offset = struct.unpack(f"{endian}q", head[168:176])[0]
            break
    else:
        return None
    count = dims[0]
    if not 1 <= count <= 7 or min(dims[1 : count + 1]) < 1 or bitpix < 8 or bitpix % 8 or not math.isfinite(offset):
        return None
    return int(offset) + math.prod(dims[1 : count + 1]) * bitpix // 8


def check_nifti_length(path: Path, head: bytes, length: int) -> None:
    """Refuse a NIfTI file whose data (``length`` bytes: the file's size, or the decompressed size of a ``.nii.gz``)
    ends before the voxels its header ``head`` announces.

    Raises:
        InputError: names the file, the announced and the actual length.
    """
    end = nifti_data_end(head)
    if end is not None and length < end:
        raise InputError(
            f"{shown(path)}: cannot read image (truncated NIfTI data: the header announces {end} bytes up to the last "
            f"voxel, the data holds {length})"
        )

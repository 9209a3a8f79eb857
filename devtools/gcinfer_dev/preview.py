"""Write a PNG preview of a label map: three orthogonal mid-slices of the image with the labels overlaid."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from gcinfer.errors import InputError
from gcinfer.io import atomic_path, read_image

ALPHA = 0.45
HEIGHT = 256


def _palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours; label 0 is unused (transparent)."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = np.stack([np.abs(hues * 6 - 3) - 1, 2 - np.abs(hues * 6 - 2), 2 - np.abs(hues * 6 - 4)], axis=1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _window(image: np.ndarray) -> np.ndarray:
    """Scale to uint8 between the 1st and 99th percentile."""
    low, high = np.percentile(image, [1, 99])
    scaled = (image.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _overlay(gray: np.ndarray, labels: np.ndarray, aspect: float) -> Image.Image:
    """RGB tile of a 2D slice (rows, cols) with labels blended in, resized to HEIGHT rows.

    ``aspect`` is the column spacing divided by the row spacing, so that the tile has physical proportions.
    """
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    colours = _palette(int(labels.max()) + 1).astype(np.float32)
    mask = labels > 0
    rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colours[labels[mask]]
    tile = Image.fromarray(rgb.astype(np.uint8))
    width = max(1, round(HEIGHT * labels.shape[1] * aspect / labels.shape[0]))
    return tile.resize((width, HEIGHT), Image.NEAREST)


def render_preview(image_zyx: np.ndarray, labels_zyx: np.ndarray, spacing_zyx: Sequence[float]) -> Image.Image:
    """Axial, coronal and sagittal mid-slices side by side (image windowed, labels coloured)."""
    gray, labels = _window(image_zyx), labels_zyx.astype(np.int64)
    sz, sy, sx = spacing_zyx
    z, y, x = (n // 2 for n in labels.shape)
    tiles = [  # axial as stored; coronal and sagittal with z pointing up
        _overlay(gray[z], labels[z], sx / sy),
        _overlay(gray[::-1, y], labels[::-1, y], sx / sz),
        _overlay(gray[::-1, :, x], labels[::-1, :, x], sy / sz),
    ]
    sheet = Image.new("RGB", (sum(t.width for t in tiles), HEIGHT))
    left = 0
    for tile in tiles:
        sheet.paste(tile, (left, 0))
        left += tile.width
    return sheet


def write_preview(image_path: Path, labels_path: Path, png_path: Path) -> Path:
    """Render ``labels_path`` over ``image_path`` into ``png_path`` (atomically).

    Raises:
        InputError: unreadable inputs, or label map and image of different shapes.
    """
    image, geometry = read_image(image_path)
    labels, _ = read_image(labels_path)
    if labels.shape != image.shape:
        raise InputError(f"{labels_path}: shape {labels.shape} differs from the image's {image.shape}")
    with atomic_path(png_path, ".png") as tmp:
        render_preview(image, labels, geometry.spacing_zyx).save(tmp, format="PNG")
    return Path(png_path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="the input image")
    parser.add_argument("labels", type=Path, help="a label map on the image's grid")
    parser.add_argument("png", type=Path, help="the PNG to write")


def run(args: argparse.Namespace) -> int:
    print(write_preview(args.image, args.labels, args.png))
    return 0

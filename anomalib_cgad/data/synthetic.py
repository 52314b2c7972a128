"""Small synthetic MVTecAD-format datasets for tests and offline demos.

Each class has its own appearance (a texture or an object on a background), so a model trained on some
classes meets a genuinely different normal appearance on a held-out class. Test images carry pasted
defects (scratches, blobs, colour stains, missing pieces) with exact ground-truth masks.

Layout (the one ``anomalib.data.MVTecAD`` reads)::

    root/<class>/train/good/000.png
    root/<class>/test/good/000.png
    root/<class>/test/<defect>/000.png
    root/<class>/ground_truth/<defect>/000_mask.png   (0 / 255)

Everything is drawn from one ``numpy`` generator seeded per class, so the same seed gives byte-identical
files.

Example:
    >>> from anomalib_cgad.data import make_synthetic_mvtec
    >>> root = make_synthetic_mvtec("/tmp/toy", categories=("stripes", "dots"), seed=0)
    >>> sorted(p.name for p in root.iterdir())
    ['dots', 'stripes']
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("scratch", "blob", "stain")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(0.0, 1.0, size, dtype=np.float64)
    return np.meshgrid(axis, axis, indexing="ij")


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    angle = rng.uniform(0.6, 0.9)
    freq = rng.uniform(7.5, 8.5)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    base = np.array([0.25, 0.35, 0.75]) + rng.normal(0, 0.02, 3)
    return base[None, None] * (0.55 + 0.45 * wave[..., None])


def _dots(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    period = 1 / rng.uniform(5.5, 6.5)
    oy, ox = rng.uniform(0, period, 2)
    dy = ((yy + oy) % period) / period - 0.5
    dx = ((xx + ox) % period) / period - 0.5
    dots = (np.sqrt(dy**2 + dx**2) < 0.28).astype(np.float64)
    background = np.array([0.85, 0.8, 0.55]) + rng.normal(0, 0.02, 3)
    dot_colour = np.array([0.55, 0.3, 0.15])
    return background[None, None] * (1 - dots[..., None]) + dot_colour[None, None] * dots[..., None]


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    cells = rng.uniform(4.5, 5.5)
    oy, ox = rng.uniform(0, 1, 2)
    board = ((np.floor((yy + oy / cells) * cells) + np.floor((xx + ox / cells) * cells)) % 2).astype(np.float64)
    dark, light = np.array([0.2, 0.45, 0.25]), np.array([0.7, 0.85, 0.65])
    return dark[None, None] * (1 - board[..., None]) + light[None, None] * board[..., None]


def _waves(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    freq = rng.uniform(3.5, 4.5)
    wave = (
        0.5
        + 0.25 * np.sin(2 * np.pi * freq * xx + 2 * np.sin(2 * np.pi * 2 * yy))
        + 0.25 * np.cos(2 * np.pi * freq * yy + rng.uniform(0, 2 * np.pi))
    )
    low, high = np.array([0.6, 0.2, 0.2]), np.array([0.95, 0.75, 0.45])
    return low[None, None] * (1 - wave[..., None]) + high[None, None] * wave[..., None]


def _object(rng: np.random.Generator, size: int) -> np.ndarray:
    """A round part (a 'washer') centred with jitter on a plain background."""
    yy, xx = _grid(size)
    cy, cx = 0.5 + rng.normal(0, 0.02, 2)
    radius = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    outer, inner = rng.uniform(0.33, 0.36), rng.uniform(0.13, 0.15)
    ring = ((radius < outer) & (radius > inner)).astype(np.float64)
    shade = 0.75 + 0.2 * np.cos(np.arctan2(yy - cy, xx - cx))
    background = np.array([0.12, 0.12, 0.14])
    metal = np.array([0.7, 0.72, 0.75])
    return background[None, None] * (1 - ring[..., None]) + (metal[None, None] * shade[..., None]) * ring[..., None]


APPEARANCES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "stripes": _stripes,
    "dots": _dots,
    "checker": _checker,
    "waves": _waves,
    "washer": _object,
}
"""The base families; :func:`appearance` also draws their numbered variants (``"stripes_7"``)."""

TINTS = np.array(
    [[1.0, 1.0, 1.0], [1.0, 0.55, 0.55], [0.55, 1.0, 0.55], [0.55, 0.55, 1.0], [1.0, 1.0, 0.45], [0.45, 1.0, 1.0]]
)
"""Per-channel gains of the variants' colours (the first keeps the family's): a tint, not a channel reordering,
so that grey families (``washer``) change colour too."""
VARIANTS = 17
"""Numbered variants per family (``_1`` … ``_17``), so 5 × 18 = 90 distinct classes can be generated."""


def _unknown_message(unknown: Sequence[str]) -> str:
    return (
        f"Unknown synthetic categories {list(unknown)}; available: {sorted(APPEARANCES)} or their variants "
        f"'<family>_<n>' with 1 <= n <= {VARIANTS}."
    )


def appearance(category: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    """The drawing function of a class: a base family of ``APPEARANCES`` or one of its numbered variants.

    More classes than the five families are needed to measure how training scales with the number of source
    classes (MVTec-size sources). Variant ``<family>_<n>`` (``1 <= n <= VARIANTS``) changes the family's
    colour and scale, so it is a different class to the model while keeping the family's structure:

    - colour: the family's image times ``TINTS[n % 6]`` per channel (unchanged for ``n = 6, 12``);
    - scale: the family drawn at ``zoom = 1 + 0.5 * (n // 6)`` times the size and centre-cropped, so its
      pattern is ``zoom`` times coarser (``n = 1..5``: 1, ``6..11``: 1.5, ``12..17``: 2).

    No two of the 18 versions of a family share both colour and scale.

    Raises:
        ValueError: an unknown family or a variant number outside ``1..VARIANTS``.
    """
    if category in APPEARANCES:
        return APPEARANCES[category]
    family, _, number = category.rpartition("_")
    if family not in APPEARANCES or not number.isdigit() or not 1 <= int(number) <= VARIANTS:
        raise ValueError(_unknown_message([category]))
    n, draw = int(number), APPEARANCES[family]
    tint = TINTS[n % len(TINTS)]
    zoom = 1 + 0.5 * (n // len(TINTS))

    def variant(rng: np.random.Generator, size: int) -> np.ndarray:
        big = round(size * zoom)
        start = (big - size) // 2
        return draw(rng, big)[start : start + size, start : start + size] * tint

    return variant


def _defect_mask(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.4) * size
        width = max(1.5, 0.025 * size)
        along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        across = -(yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        return (np.abs(along) < length / 2) & (np.abs(across) < width)
    radius = rng.uniform(0.07, 0.12) * size
    wobble = 1 + 0.25 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi))
    return np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) < radius * wobble


def _paint_defect(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, kind: str, strength: float = 1.0
) -> np.ndarray:
    out = image.copy()
    if kind == "scratch":
        out[mask] = np.array([0.95, 0.95, 0.92]) + rng.normal(0, 0.02, 3)
    elif kind == "blob":
        out[mask] = np.array([0.08, 0.06, 0.05]) + rng.normal(0, 0.02, 3)
    else:  # stain: a strong colour shift that keeps the texture underneath
        out[mask] = 0.35 * out[mask] + 0.65 * (np.array([0.1, 0.8, 0.1]) + rng.normal(0, 0.03, 3))
    if strength == 1.0:
        return out
    return image + strength * (out - image)  # a faint defect: part of the way from the normal pixels


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(array * 255), 0, 255).astype(np.uint8)).save(path)


def make_synthetic_mvtec(
    root: str | Path,
    categories: Sequence[str] = ("stripes", "dots", "checker", "waves"),
    n_train: int = 12,
    n_test_good: int = 6,
    n_test_bad: int = 6,
    image_size: int = 96,
    seed: int = 0,
    defect_strength: float = 1.0,
) -> Path:
    """Write a small MVTecAD-format dataset and return its root.

    Args:
        root (str | Path): output folder (created). Existing class folders are left untouched if they were
            generated with the same arguments; a class folder holding other files raises ``FileExistsError``.
        categories (Sequence[str]): classes to generate, from ``APPEARANCES``
            (``stripes``, ``dots``, ``checker``, ``waves``, ``washer``) or their numbered variants
            (``stripes_1`` … ``stripes_17``, see :func:`appearance`).
        n_train (int): normal training images per class. Defaults to ``12``.
        n_test_good (int): normal test images per class. Defaults to ``6``.
        n_test_bad (int): defective test images per class, spread over the defect types. Defaults to ``6``.
        image_size (int): square image size in pixels. Defaults to ``96``.
        seed (int): base seed; each class derives its own generator from it. Defaults to ``0``.
        defect_strength (float): how far a defect's pixels move from the normal ones towards the painted
            defect, in ``(0, 1]``: ``1`` paints it fully, ``0.2`` leaves a faint trace (a harder benchmark).
            Masks are the same whatever the strength. Defaults to ``1.0``.

    Returns:
        Path: ``root``.

    Raises:
        ValueError: an unknown category, a non-positive count or a defect strength outside ``(0, 1]``.
    """
    unknown = []
    for category in categories:  # every name is checked before any file is written
        try:
            appearance(category)
        except ValueError:
            unknown.append(category)
    if unknown:
        raise ValueError(_unknown_message(unknown))
    if min(n_train, n_test_good, n_test_bad) < 1 or image_size < 16:
        msg = "n_train, n_test_good and n_test_bad must be >= 1 and image_size >= 16."
        raise ValueError(msg)
    if not 0.0 < defect_strength <= 1.0:
        msg = f"defect_strength must lie in (0, 1], got {defect_strength}."
        raise ValueError(msg)
    root = Path(root)
    stamp = f"{n_train}-{n_test_good}-{n_test_bad}-{image_size}-{seed}"
    if defect_strength != 1.0:
        stamp += f"-{defect_strength}"
    for category in categories:
        folder = root / category
        marker = folder / ".synthetic"
        if marker.is_file() and marker.read_text() == stamp:
            continue
        if folder.exists() and any(folder.iterdir()):
            msg = f"'{folder}' exists and was not generated with these arguments; choose an empty root."
            raise FileExistsError(msg)
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        draw = appearance(category)
        for i in range(n_train):
            _save(draw(rng, image_size), folder / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(draw(rng, image_size), folder / "test" / "good" / f"{i:03d}.png")
        counters = dict.fromkeys(DEFECTS, 0)
        for i in range(n_test_bad):
            kind = DEFECTS[i % len(DEFECTS)]
            index = counters[kind]
            counters[kind] += 1
            mask = _defect_mask(rng, image_size, kind)
            image = _paint_defect(rng, draw(rng, image_size), mask, kind, defect_strength)
            _save(image, folder / "test" / kind / f"{index:03d}.png")
            _save(mask.astype(np.float64), folder / "ground_truth" / kind / f"{index:03d}_mask.png")
        marker.write_text(stamp)
    return root

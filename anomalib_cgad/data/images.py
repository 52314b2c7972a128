"""The torch side of the one input policy: reference images and the batches anomalib's readers made.

:mod:`anomalib_cgad.deploy.inferencer` holds the policy itself, torch-free (``read_image``, ``image_array``,
the unreadable-file scan); this module turns its pixels into the tensors the Lightning models use:

- :func:`list_images` / :func:`load_images` / :func:`reference_tensor`: the k reference images a user gives
  (a folder, files, tensors or arrays) as float ``(k, 3, H, W)`` in [0, 1];
- :func:`reread_wide_images`: anomalib's dataset reader clips 16-bit files to white, so those rows of a
  batch are read again with the policy, and a 16-bit copy of a picture scores like its 8-bit original;
- :func:`check_finite`: NaN/inf pixels or scores are refused with the images named.

It lives under ``data`` because both sides of the data flow use it: the datamodules (``CrossClass``'s
references) and the models (``anomalib_cgad.models.references``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from anomalib_cgad.deploy.inferencer import IMAGE_SUFFIXES, WIDE_MODES, ImageInputError, image_array, read_image

__all__ = [
    "IMAGE_SUFFIXES",
    "NonFiniteError",
    "ReferenceError",
    "check_finite",
    "is_wide_image",
    "list_images",
    "load_images",
    "reference_tensor",
    "reread_wide_images",
]


class ReferenceError(ValueError):
    """The k-shot references of a class cannot be obtained."""


class NonFiniteError(ValueError):
    """Images or features hold NaN or inf values, which would give NaN scores."""


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of a folder (sorted) or an explicit list; raises if missing or empty."""
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.exists():
            msg = f"Reference source '{folder}' does not exist."
            raise ReferenceError(msg)
        paths = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else [folder]
        )
        if not paths:
            msg = f"Reference folder '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})."
            raise ReferenceError(msg)
        return paths
    paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        msg = f"Reference images not found: {missing}"
        raise ReferenceError(msg)
    return paths


def load_images(paths: Sequence[str | Path], size: tuple[int, int]) -> torch.Tensor:
    """Load images as RGB float ``(N, 3, H, W)`` in [0, 1], resized to ``size``, with the one input policy.

    Pixels come from :func:`anomalib_cgad.deploy.inferencer.read_image` (grayscale, RGBA, palette, 16-bit
    and any size accepted, converted as in every other entry point); the resize is torch's bilinear one
    without antialiasing, the same as the models' pre-processor ``Resize``.

    Raises:
        ReferenceError: a file cannot be read (named), or holds pixels of unknown scale.
    """
    images = []
    for path in paths:
        try:
            array = read_image(path, None)
        except ImageInputError as exc:
            cause = exc.__cause__
            msg = f"Could not read reference image '{path}': {cause}" if cause is not None else str(exc)
            raise ReferenceError(msg) from exc
        resized = F.interpolate(torch.from_numpy(array)[None], size=tuple(size), mode="bilinear", align_corners=False)
        images.append(resized[0])
    return torch.stack(images)


def is_wide_image(path: str | Path) -> bool:
    """Whether ``path`` is a 16/32-bit integer image (read from its header only; ``False`` if unreadable)."""
    try:
        with Image.open(path) as image:
            return image.mode in WIDE_MODES
    except (UnidentifiedImageError, OSError, TypeError, ValueError):
        return False


def reread_wide_images(images: torch.Tensor, paths: Sequence[str] | None, transform=None) -> torch.Tensor:
    """Replace the images anomalib's dataset reader clipped (16-bit files) by the one input policy's pixels.

    anomalib's reader is ``Image.open(path).convert("RGB")``: identical to :func:`load_images` for 8-bit
    files, but it clips 16-bit ones to white. Those rows are read again at the batch's size and, when
    ``transform`` is given (the batch is already pre-processed), passed through it, so a 16-bit copy of a
    picture gets the score of its 8-bit original in training, validation, test and ``anomalib predict``.
    Only headers are read for the other files.
    """
    rows = [i for i, path in enumerate(paths or []) if is_wide_image(path)]
    if not rows:
        return images
    fixed = load_images([paths[i] for i in rows], tuple(images.shape[-2:])).to(images.device, images.dtype)
    if transform is not None:
        fixed = transform(fixed)
    images = images.clone()
    images[rows] = fixed
    return images


def reference_tensor(images, size: tuple[int, int], k_shot: int | None = None) -> torch.Tensor:
    """Reference images given to the Python API, as float ``(k, 3, H, W)`` in [0, 1] (the one input policy).

    Accepts a ``(k, 3, H, W)`` tensor or array (uint8/uint16 are scaled; floats must lie in [0, 1]), a
    list of ``(3, H, W)`` tensors/arrays (each resized to ``size``), a folder or a list of image files.

    Raises:
        ReferenceError: no images, a wrong shape, or a list mixing files and tensors.
        ImageInputError: floats outside [0, 1] or an unsupported dtype.
    """
    if isinstance(images, str | Path):
        return load_images(list_images(images), size)
    if isinstance(images, list | tuple):
        if not images:
            msg = "No reference images given (an empty list): pass k normal images of the class."
            raise ReferenceError(msg)
        if all(isinstance(item, str | Path) for item in images):
            return load_images(list_images(list(images)), size)
        if any(isinstance(item, str | Path) for item in images):
            msg = "Reference images must be all file paths or all tensors/arrays, not a mix."
            raise ReferenceError(msg)
        items = [reference_tensor(item, size) for item in images]
        return torch.cat([F.interpolate(item, size=tuple(size), mode="bilinear", align_corners=False)
                          if tuple(item.shape[-2:]) != tuple(size) else item for item in items])  # fmt: skip
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        msg = f"Reference images must be a tensor, an array, a folder or a list of files; got {type(images).__name__}."
        raise ReferenceError(msg)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"Reference images must have shape (k, 3, H, W); got {tuple(images.shape)}."
        raise ReferenceError(msg)
    if images.shape[0] == 0 or images.numel() == 0:
        msg = f"No reference images given (shape {tuple(images.shape)}): pass k normal images of the class."
        raise ReferenceError(msg)
    if images.dtype == torch.bfloat16:
        images = images.float()
    return torch.from_numpy(image_array(images.detach().cpu().numpy(), "Reference images"))


def check_finite(values: torch.Tensor, paths: Sequence[str] | None, problem: str) -> None:
    """Raise :class:`NonFiniteError` naming the images (paths or batch indices) whose ``values`` are not finite."""
    bad = (~torch.isfinite(values)).reshape(len(values), -1).any(1).nonzero().flatten().tolist()
    if bad:
        names = [str(paths[i]) for i in bad] if paths else [f"batch index {i}" for i in bad]
        msg = f"{len(bad)} image(s) {problem}: {names[:5]}."
        raise NonFiniteError(msg)

"""Torch-free OpenVINO inference with a swappable reference bank (numpy, Pillow and openvino only).

This file imports nothing from torch or anomalib (from anomalib-cgad only two stdlib/numpy leaf modules:
``coreset.py``, the bank's coreset, and ``errors.py``, :class:`~anomalib_cgad.errors.BankError`), so a
deployment runs it on a machine without torch. It reads the folder written by
:func:`anomalib_cgad.deploy.export_swappable_bank` (or by ``anomalib export --export_type openvino`` on a
model with :class:`anomalib_cgad.deploy.BankExportMixin`):

- ``bank_encoder.xml``: k reference images in [0, 1] → the bank tensors of their class;
- ``bank_model.xml``: images in [0, 1] + bank tensors → ``pred_score``, ``pred_label``, ``anomaly_map``,
  ``pred_mask`` (pre- and post-processing embedded, as in anomalib's own IR);
- ``bank.npz``: the bank the model held at export time; ``bank_metadata.json``: names, sizes, fingerprint,
  and the model's normal-only calibration (``far_grid``/``tau_grid``, see below).

**Normal-only operating point.** Every bank also holds ``reference_stats = (location, scale)`` of its class,
computed from the k references alone by leave-one-out: each reference is scored against a bank of the other
k − 1 (with k = 1, against its own mirror image); ``location`` is the mean of those k image scores and
``scale`` the standard deviation of all their anomaly-map pixels. A class's good/bad threshold on the raw
image score is ``location + scale · tau(rate)``, where ``tau(rate)`` is the ``1 − rate`` quantile of
*normalised* normal scores ``(score − location) / scale`` measured on the model's training classes by
episodes (each training class plays the new product: k references drawn from it, its held-out normals
scored), so no anomalous image of the new class is needed. The bank model graph takes
``operating_point = (location, scale, tau)`` as an input and scores ``(raw − location) / scale − tau``,
so anomalib's post-processor, whose threshold is fixed at 0, labels every class at its own threshold.

Onboarding a new product = :meth:`BankInferencer.compute_bank` on k normal images, :meth:`Bank.save`,
then :meth:`BankInferencer.predict` with that bank. No re-export, no retraining.

This file also holds the plugin's one input policy (:func:`read_image` for files, :func:`image_array` for
arrays, :func:`bad_images_mode` for unreadable files), which the torch models and datamodules import, so
every entry point converts an image the same way.

The bank file (``.npz``: arrays ``bank_0 … bank_n`` + a JSON ``__metadata__`` string, read with
``allow_pickle=False``) is the same one the torch models read and write
(``model.load_bank`` / ``model.save_bank``, or :func:`anomalib_cgad.deploy.load_model_bank` /
:func:`anomalib_cgad.deploy.save_model_bank`).

Notes:
    On CPUs with AMX/AVX512-BF16, OpenVINO's CPU plugin defaults to bf16 inference, which moves scores by
    about 3e-2. :class:`BankInferencer` compiles with ``INFERENCE_PRECISION_HINT=f32`` unless told otherwise.

Example:
    >>> from anomalib_cgad.deploy.inferencer import BankInferencer
    >>> inferencer = BankInferencer("exports/cgad")  # doctest: +SKIP
    >>> bank = inferencer.compute_bank(["ref1.png", "ref2.png", "ref3.png", "ref4.png"])  # doctest: +SKIP
    >>> bank.save("banks/new_product.npz")  # doctest: +SKIP
    >>> inferencer.predict("query.png", bank)["pred_score"]  # doctest: +SKIP
    array([0.31], dtype=float32)
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomalib_cgad.coreset import coreset_indices
from anomalib_cgad.errors import BankError

BANK_MODEL = "bank_model"
BANK_ENCODER = "bank_encoder"
BANK_FILE = "bank.npz"
METADATA = "bank_metadata.json"
BANK_FORMAT = "anomalib-cgad-bank/3"
LEGACY_BANK_FORMATS = ("anomalib-cgad-bank/2",)  # banks written before the normal-only operating point
OPERATING_POINT = "operating_point"  # the bank model graph's input (location, scale, tau)
DEFAULT_FALSE_ALARM_RATE = 0.05
# Requested false-alarm rates at which the calibration stores tau (the 1 - rate quantile); other rates are
# interpolated linearly in log(rate).
FAR_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
F32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# Metadata keys a bank must share with the model that uses it.
COMPATIBILITY_KEYS = ("format", "model", "fingerprint", "backbone", "layers", "channels", "image_size", "adaptation")
# What a bank written before a key existed means by it: CGAD banks before class adaptation had none.
IMPLIED_METADATA = {"adaptation": "none"}
# bank_metadata.json key naming anomalib's IR written in the same export (file name + digest of .xml and .bin).
IR_KEY = "anomalib_ir"


def ir_digest(xml: str | Path) -> str:
    """sha256 of an OpenVINO IR's ``.xml`` and ``.bin``: which ``model.xml`` the bank graphs were exported with."""
    xml = Path(xml)
    digest = hashlib.sha256()
    for path in (xml, xml.with_suffix(".bin")):
        if path.is_file():
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def check_ir_belongs(folder: Path, metadata: dict) -> None:
    """Refuse bank graphs whose ``model.xml`` neighbour was replaced by another export (a mixed folder).

    anomalib's own models overwrite ``model.xml`` / ``model.bin`` and leave other files alone, so exporting a
    built-in model into the root of ours would otherwise leave bank graphs that look valid beside a foreign IR.

    Raises:
        BankError: ``model.xml`` is there but is not the one exported with these bank graphs.
    """
    record = metadata.get(IR_KEY)
    if not record:
        return  # bank graphs exported on their own (export_swappable_bank): no anomalib IR to match
    xml = folder / record["file"]
    if xml.is_file() and ir_digest(xml) != record["sha256"]:
        msg = (
            f"'{folder}' mixes two exports: {record['file']} was replaced after the bank graphs were written "
            "(another model exported into the same root?); re-export this model or use its own export root."
        )
        raise BankError(msg)


def check_false_alarm_rate(rate: float) -> float:
    """Return ``rate`` as a float; raise ``ValueError`` unless it lies in ``[0.001, 0.5]`` (the calibrated grid)."""
    rate = float(rate)
    if not FAR_GRID[0] <= rate <= FAR_GRID[-1]:
        msg = f"false_alarm_rate must lie in [{FAR_GRID[0]}, {FAR_GRID[-1]}] (a share of normal images), got {rate}."
        raise ValueError(msg)
    return rate


def leave_one_out_sets(k: int) -> list[tuple[int, list[int] | None]]:
    """``(held-out reference, the references its bank is built from)`` for each of k references.

    ``None`` (k = 1): the bank is built from the held-out reference's horizontal mirror image, the only
    "other normal image" one reference gives.

    Example:
        >>> leave_one_out_sets(3)
        [(0, [1, 2]), (1, [0, 2]), (2, [0, 1])]
    """
    if k == 1:
        return [(0, None)]
    return [(i, [j for j in range(k) if j != i]) for i in range(k)]


def reference_statistics(scores: Sequence[float], maps: Sequence[np.ndarray]) -> np.ndarray:
    """``(location, scale)`` of a class from its references' leave-one-out image scores and maps.

    ``location`` = mean leave-one-out image score; ``scale`` = standard deviation of every pixel of the
    leave-one-out anomaly maps. The image score is the maximum of the map, so its spread over normal images
    grows with the spread of the map (for a maximum of n near-Gaussian values, location ≈ μ + a_n·σ and
    spread ≈ b_n·σ): the pixel standard deviation is that spread measured on k·H·W values, far steadier
    than the standard deviation of k = 4 image scores.
    """
    pixels = np.concatenate([np.asarray(m, dtype=np.float64).reshape(-1) for m in maps])
    scale = max(float(pixels.std()), 1e-6)
    return np.array([float(np.mean(np.asarray(scores, dtype=np.float64))), scale], dtype=np.float32)


def calibrated_tau(far_grid: Sequence[float], tau_grid: Sequence[float], rate: float) -> float:
    """``tau(rate)``: the calibration's normalised threshold at ``rate``, interpolated in ``log(rate)``.

    Example:
        >>> calibrated_tau([0.01, 0.1], [3.0, 1.0], 0.1)
        1.0
    """
    taus = np.asarray(tau_grid, dtype=np.float64)
    if taus.size == 0 or not np.isfinite(taus).all():
        msg = (
            "The model has no calibrated operating point (it was trained or exported before the normal-only "
            "operating point existed). Recalibrate it on its training classes: "
            "model.calibrate_operating_point(datamodule)."
        )
        raise BankError(msg)
    low, weight = interpolation_weights(far_grid, rate)
    return float(taus[low] * (1 - weight) + taus[min(low + 1, len(taus) - 1)] * weight)


def interpolation_weights(far_grid: Sequence[float], rate: float) -> tuple[int, float]:
    """``(i, w)`` with ``log(rate) = (1 − w)·log(grid[i]) + w·log(grid[i + 1])`` (plain numbers, so a torch
    model applies them to its ``tau_grid`` buffer without a data-dependent step while exporting)."""
    rate = check_false_alarm_rate(rate)
    logs = np.log(np.asarray(far_grid, dtype=np.float64))
    low = int(np.clip(np.searchsorted(logs, np.log(rate), side="right") - 1, 0, len(logs) - 2))
    weight = float(np.clip((np.log(rate) - logs[low]) / (logs[low + 1] - logs[low]), 0.0, 1.0))
    return low, weight


def normal_quantiles(normalised: Sequence[float], far_grid: Sequence[float] = FAR_GRID) -> np.ndarray:
    """``tau`` at each rate of ``far_grid``: the ``1 − rate`` quantile of pooled normalised normal scores.

    Made non-increasing in the rate (a higher accepted false-alarm rate never raises the threshold).

    Raises:
        ValueError: some scores are NaN or inf (a quantile of them would be NaN, read later as "not calibrated").
    """
    values = np.asarray(normalised, dtype=np.float64)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        msg = (
            f"{bad} of {values.size} normalised normal scores of the operating point's calibration are NaN or "
            "inf: the model scores its own training classes' normal images as non-finite (e.g. a statistic "
            "estimated from too few reference images), so no threshold can be calibrated from them."
        )
        raise ValueError(msg)
    taus = np.quantile(values, 1.0 - np.asarray(far_grid, dtype=np.float64))
    return np.minimum.accumulate(taus).astype(np.float32)


@dataclass
class Bank:
    """The reference bank of one class: a list of arrays plus what they were computed with.

    Args:
        tensors (list[np.ndarray]): the bank tensors in the model's order (CGAD: levels, then ``scale``).
        metadata (dict): model name, fingerprint of the weights, backbone, layers, image size, ``num_refs``.
        reference_stats (np.ndarray): ``(location, scale)`` of the class's leave-one-out scores, the class's
            normal-only operating point (module docstring). Defaults to ``(0, 1)``.

    Example:
        >>> bank = Bank([np.zeros((4, 2), np.float32)], {"model": "ResAD"})
        >>> bank.num_rows
        [4]
    """

    tensors: list[np.ndarray]
    metadata: dict = field(default_factory=dict)
    reference_stats: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0], dtype=np.float32))

    @property
    def num_rows(self) -> list[int]:
        """Rows of each tensor (patches of the k references per level)."""
        return [int(t.shape[0]) if t.ndim else 1 for t in self.tensors]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the bank as ``.npz`` (no pickle).

        Args:
            path (str | Path): target file (``.npz`` is appended by numpy when missing, so it is required).
            overwrite (bool): replace an existing file. Defaults to ``False``.

        Returns:
            Path: the written file.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is ``False``.
            ValueError: ``path`` does not end with ``.npz``.
        """
        path = Path(path)
        if path.suffix != ".npz":
            msg = f"A bank file must end with '.npz'; got '{path}'."
            raise ValueError(msg)
        if path.exists() and not overwrite:
            msg = f"Refusing to overwrite existing bank file '{path}' (pass overwrite=True / --overwrite)."
            raise FileExistsError(msg)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"bank_{i}": np.ascontiguousarray(t, dtype=np.float32) for i, t in enumerate(self.tensors)}
        metadata = {**self.metadata, "format": BANK_FORMAT}
        stats = np.asarray(self.reference_stats, dtype=np.float32).reshape(2)
        np.savez(path, __metadata__=np.array(json.dumps(metadata)), reference_stats=stats, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Bank:
        """Read a bank written by :meth:`save` (``allow_pickle=False``).

        Raises:
            FileNotFoundError: no such file.
            BankError: the file is not an anomalib-cgad bank.
        """
        path = Path(path)
        if not path.is_file():
            msg = f"Bank file '{path}' does not exist."
            raise FileNotFoundError(msg)
        try:
            with np.load(path, allow_pickle=False) as data:
                metadata = json.loads(str(data["__metadata__"]))
                names = sorted((k for k in data.files if k.startswith("bank_")), key=lambda k: int(k.split("_")[1]))
                tensors = [np.asarray(data[name], dtype=np.float32) for name in names]
                stats = np.asarray(data["reference_stats"], dtype=np.float32) if "reference_stats" in data else None
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:  # JSONDecodeError: ValueError
            if _is_torch_file(path):
                msg = (
                    f"'{path}' is a torch (.pt) bank file, a format anomalib-cgad no longer reads: banks are '.npz' "
                    "files, which also carry the class's operating point. Recompute it from the class's k normal "
                    "images: model.set_references(images) then model.save_bank('NEW.npz'), or 'anomalib-cgad bank'."
                )
                raise BankError(msg) from exc
            if path.stat().st_size == 0:
                reason = "the file is empty"
            elif "pickled" in str(exc):  # numpy's word for "neither .npy nor .npz"
                reason = "it is not an .npz archive"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            msg = f"'{path}' is not a reference bank file written by anomalib-cgad (truncated or damaged?): {reason}"
            raise BankError(msg) from exc
        if metadata.get("format") in LEGACY_BANK_FORMATS:
            msg = (
                f"'{path}' was written before banks carried a normal-only operating point (format "
                f"{metadata.get('format')!r}), so it cannot label images. Recompute it from the class's k normal "
                "images: 'anomalib-cgad bank --images DIR --model EXPORT --out NEW.npz', "
                "BankInferencer.compute_bank, or model.set_references(images) then model.save_bank('NEW.npz')."
            )
            raise BankError(msg)
        if metadata.get("format") != BANK_FORMAT or not tensors or stats is None or stats.shape != (2,):
            msg = f"'{path}' is not an anomalib-cgad bank file (format {metadata.get('format')!r})."
            raise BankError(msg)
        return cls(tensors, metadata, stats)

    def check(self, expected: dict, source: str = "the bank") -> None:
        """Raise :class:`BankError` naming every compatibility key where the bank differs from ``expected``."""
        metadata = {**{key: value for key, value in IMPLIED_METADATA.items() if key in expected}, **self.metadata}
        problems = [
            f"{key}: bank has {metadata.get(key)!r}, model has {expected[key]!r}"
            for key in COMPATIBILITY_KEYS
            if key in expected and key in metadata and _plain(metadata[key]) != _plain(expected[key])
        ]
        if problems:
            msg = f"{source} does not fit this model ({'; '.join(problems)}). Recompute it from the k images."
            raise BankError(msg)
        for i, tensor in enumerate(self.tensors):
            if not np.isfinite(tensor).all():
                msg = f"{source}: bank_{i} holds NaN or inf values."
                raise BankError(msg)
        stats = np.asarray(self.reference_stats, dtype=np.float32).reshape(-1)
        if stats.shape != (2,) or not np.isfinite(stats).all() or stats[1] <= 0:
            msg = f"{source}: reference_stats must be a finite (location, scale > 0) pair, got {stats.tolist()}."
            raise BankError(msg)


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` archive (a zip holding ``<name>/data.pkl``), e.g. an old bank."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _plain(value: object) -> object:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of a folder (sorted by name) or an explicit list of files.

    Raises:
        FileNotFoundError: the folder or a file does not exist.
        ValueError: the folder holds no image files.
    """
    if isinstance(source, str | Path):
        source = [source]
    paths: list[Path] = []
    for item in map(Path, source):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                msg = f"Folder '{item}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})."
                raise ValueError(msg)
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            msg = f"Image path '{item}' does not exist."
            raise FileNotFoundError(msg)
    return paths


def resize_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a ``(C, H, W)`` float array, identical to torch's ``interpolate(align_corners=False)``.

    The models load reference images this way (``anomalib_cgad.models.base.load_images``), so OpenVINO and
    torch see the same pixels. Without antialiasing, as in the models' pre-processor.

    Example:
        >>> resize_bilinear(np.arange(4, dtype=np.float32).reshape(1, 2, 2), (4, 4))[0, 0]
        array([0.  , 0.25, 0.75, 1.  ], dtype=float32)
    """
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = image.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return image.astype(np.float32, copy=False)

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
        low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), (src - low).astype(np.float32)

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    rows = image[:, y0] * (1 - wy)[:, None] + image[:, y1] * wy[:, None]
    return (rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx).astype(np.float32)


# ----------------------------------------------------------------- the input policy
# Every entry point (training data, references, anomalib predict, bank, predict-ov, the Python API) reads
# images and checks arrays with the functions below, so the same picture gives the same pixels everywhere.
WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
BAD_IMAGE_CHOICES = ("stop", "skip")
BAD_IMAGES_ENV = "ANOMALIB_CGAD_BAD_IMAGES"


class ImageInputError(ValueError):
    """An image file cannot be read, or an image array is not in a range the models take."""


def bad_images_mode(value: str | None = None) -> str:
    """What to do with an unreadable image file: ``"stop"`` (the default) or ``"skip"`` (and report it).

    ``value`` when given, else the ``ANOMALIB_CGAD_BAD_IMAGES`` environment variable, else ``"stop"``: a run
    that silently drops test images changes its metrics, so skipping is something the user asks for.
    """
    import os

    mode = value if value is not None else os.environ.get(BAD_IMAGES_ENV, "stop")
    if mode not in BAD_IMAGE_CHOICES:
        origin = "bad_images" if value is not None else BAD_IMAGES_ENV
        msg = f"{origin} must be one of {BAD_IMAGE_CHOICES}, got '{mode}'."
        raise ImageInputError(msg)
    return mode


def read_image(path: str | Path, size: Sequence[int] | None) -> np.ndarray:
    """One image file as RGB float ``(3, H, W)`` in [0, 1], resized to ``size`` (the one image reader).

    - 8-bit modes (grayscale, RGB, RGBA, palette, CMYK, 1-bit) are converted with Pillow's ``convert("RGB")``
      and divided by 255, exactly what anomalib's own dataset reader does (RGBA: the alpha channel is dropped).
    - 16-bit grayscale (``I;16*``, and ``I`` with values in 0..65535) is divided by 65535, so a 16-bit copy
      of an 8-bit picture (``value * 257``) gives the same pixels; anomalib's reader would clip it to white.
    - Float (``F``) and 32-bit integer images outside 0..65535 are refused: their scale is unknown.
    - A file that cannot be decoded (not an image, truncated) raises :class:`ImageInputError` naming it.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, with its name, not deep in a data loader
            if image.mode in WIDE_MODES:
                array = np.asarray(image, dtype=np.float64)  # float64, then float32: see image_array
                if array.size and (array.min() < 0 or array.max() > 65535):
                    msg = (
                        f"Image '{path}' is a 32-bit integer image with values in [{array.min():.0f}, "
                        f"{array.max():.0f}]; save it as an 8-bit or 16-bit image."
                    )
                    raise ImageInputError(msg)
                array = np.broadcast_to((array / 65535.0).astype(np.float32), (3, *array.shape))
            elif image.mode == "F":
                msg = (
                    f"Image '{path}' holds float pixels (mode F) of unknown scale; save it as an 8-bit or 16-bit image."
                )
                raise ImageInputError(msg)
            else:
                array = image_array(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        msg = f"Could not read image '{path}': {exc}"
        raise ImageInputError(msg) from exc
    return resize_bilinear(np.ascontiguousarray(array), size) if size else np.ascontiguousarray(array)


def unreadable_images(paths: Sequence[str | Path]) -> dict[str, str]:
    """``{path: reason}`` of the files among ``paths`` that :func:`read_image` cannot read.

    Each file is decoded (a truncated file only fails there), but only 16-bit, 32-bit and float files are
    converted, to check their values. (``CrossClass`` ELPV mono -> poly set-up, 2-core CPU: 0.5 s without the
    check, 5.7 s with it, 8.8 s when every file was converted too.)
    """
    bad = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                wide = image.mode in WIDE_MODES or image.mode == "F"
            if wide:
                read_image(path, None)
        except ImageInputError as exc:
            bad[str(path)] = str(exc.__cause__ or exc)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            bad[str(path)] = str(exc)
    return bad


def check_unreadable(bad: dict[str, str], where: str, mode: str) -> None:
    """Stop (raise :class:`ImageInputError`) or warn about the unreadable files ``bad`` found in ``where``."""
    if not bad:
        return
    names = ", ".join(f"'{path}' ({reason})" for path, reason in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    if mode == "stop":
        msg = (
            f"{where}: {len(bad)} image file(s) cannot be read: {names}{more}. Fix or remove them, or set "
            f"{BAD_IMAGES_ENV}=skip (bad_images='skip') to skip them."
        )
        raise ImageInputError(msg)
    import warnings

    warnings.warn(f"{where}: skipping {len(bad)} unreadable image file(s): {names}{more}", UserWarning, stacklevel=3)


def image_array(array: np.ndarray, what: str = "images") -> np.ndarray:
    """An image array as float32 in [0, 1]: uint8 is divided by 255, uint16 by 65535, floats must lie in [0, 1].

    Floats outside [0, 1] are refused rather than scored: an image in 0..255 (or one already normalised
    with ImageNet's mean and std) would otherwise be scored as garbage with no warning. NaN values are left
    for the callers' NaN checks, which name the images holding them.

    Raises:
        ImageInputError: another dtype, or floats outside [0, 1].

    Example:
        >>> image_array(np.array([0, 255], dtype=np.uint8)).tolist()
        [0.0, 1.0]
    """
    array = np.asarray(array)
    # Divided in float64, then rounded once to float32: v / 255 and (257 v) / 65535 then give the same float32,
    # equal to anomalib's float32 v / 255 (a period-8 binary fraction never rounds differently twice).
    if array.dtype == np.uint8:
        return (array / 255.0).astype(np.float32)
    if array.dtype == np.uint16:
        return (array / 65535.0).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        msg = f"{what} must be float arrays in [0, 1] or uint8/uint16 arrays; got dtype {array.dtype}."
        raise ImageInputError(msg)
    array = array.astype(np.float32, copy=False)
    finite = array[np.isfinite(array)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        msg = (
            f"{what} hold values in [{finite.min():.3g}, {finite.max():.3g}], but float images must lie in [0, 1]: "
            "divide 0..255 images by 255 (or pass them as uint8), and pass images before normalisation."
        )
        raise ImageInputError(msg)
    return array


def as_batch(
    images: str | Path | Sequence[str | Path] | np.ndarray, size: Sequence[int] | None, bad_images: str = "stop"
) -> np.ndarray:
    """Paths (files or folders) or an image array (``CHW``/``NCHW``, see :func:`image_array`) → ``(N, 3, H, W)``.

    With ``bad_images="skip"`` unreadable files are left out (with a warning); use :func:`read_batch` to
    know which ones were read.
    """
    if isinstance(images, np.ndarray):
        array = image_array(images)
        array = array[None] if array.ndim == 3 else array
        if array.ndim != 4 or array.shape[1] != 3 or 0 in array.shape:
            msg = f"Images must be (N, 3, H, W) or (3, H, W) arrays in [0, 1]; got shape {images.shape}."
            raise ImageInputError(msg)
        return np.stack([resize_bilinear(a, size) for a in array]) if size else array
    return read_batch(list_images(images), size, bad_images)[0]


def read_batch(
    paths: Sequence[str | Path], size: Sequence[int] | None, bad_images: str = "stop"
) -> tuple[np.ndarray, list[Path]]:
    """Read ``paths`` with :func:`read_image`; returns the ``(N, 3, H, W)`` batch and the paths it holds."""
    mode = bad_images_mode(bad_images)
    arrays, kept, bad = [], [], {}
    for path in map(Path, paths):
        try:
            arrays.append(read_image(path, size))
            kept.append(path)
        except ImageInputError as exc:
            if mode == "stop":
                raise
            bad[str(path)] = str(exc.__cause__ or exc)
    check_unreadable(bad, "images", mode)
    if not arrays:
        return np.zeros((0, 3, *(size or (0, 0))), np.float32), kept
    return np.stack(arrays), kept


class BankInferencer:
    """Score images against any reference bank, and compute banks from k images, with OpenVINO.

    Args:
        path (str | Path): the export folder (``<root>`` or ``<root>/weights/openvino``).
        device (str): OpenVINO device. Defaults to ``"CPU"``.
        config (dict | None): OpenVINO compile config. Defaults to ``{"INFERENCE_PRECISION_HINT": "f32"}``
            (parity with torch; pass ``{}`` for the device default, bf16 on recent Xeons).

    Attributes:
        metadata (dict): the export's ``bank_metadata.json``.
        default_bank (Bank): the bank the model held at export time.

    Raises:
        FileNotFoundError: the folder holds no swappable-bank export.
        BankError: the folder's ``model.xml`` is not the one exported with its bank graphs (a mixed folder).
    """

    def __init__(self, path: str | Path, device: str = "CPU", config: dict | None = None) -> None:
        import openvino as ov

        folder = Path(path)
        if (folder / "weights" / "openvino").is_dir():
            folder = folder / "weights" / "openvino"
        missing = [
            name for name in (METADATA, f"{BANK_MODEL}.xml", f"{BANK_ENCODER}.xml") if not (folder / name).is_file()
        ]
        if missing:
            msg = (
                f"'{path}' holds no swappable-bank export (missing {missing}). Export with "
                "anomalib_cgad.deploy.export_swappable_bank or 'anomalib export --export_type openvino'."
            )
            raise FileNotFoundError(msg)
        self.folder = folder
        self.metadata: dict = json.loads((folder / METADATA).read_text())
        check_ir_belongs(folder, self.metadata)
        core = ov.Core()
        config = dict(F32_CONFIG if config is None else config)
        self.model = core.compile_model(folder / f"{BANK_MODEL}.xml", device, config)
        self.encoder = core.compile_model(folder / f"{BANK_ENCODER}.xml", device, config)

    @property
    def image_size(self) -> list[int]:
        """``(H, W)`` the images are resized to before entering the graphs (the model's pre-processor size)."""
        return list(self.metadata["image_size"])

    @property
    def k_shot(self) -> int:
        """The number of references the model was configured with."""
        return int(self.metadata.get("k_shot", 1))

    @property
    def default_bank(self) -> Bank:
        """The bank held by the model at export time (``bank.npz``)."""
        return Bank.load(self.folder / BANK_FILE)

    def expected_metadata(self) -> dict:
        """The bank metadata this export expects (what :meth:`Bank.check` compares)."""
        return {key: self.metadata[key] for key in COMPATIBILITY_KEYS if key in self.metadata} | {"format": BANK_FORMAT}

    @property
    def false_alarm_rate(self) -> float:
        """The requested false-alarm rate the model was exported with (the default of :meth:`predict`)."""
        return float(self.metadata.get("false_alarm_rate", DEFAULT_FALSE_ALARM_RATE))

    def tau(self, false_alarm_rate: float | None = None) -> float:
        """Normalised threshold ``tau`` at a requested false-alarm rate (the export's calibration).

        Raises:
            BankError: the export holds no calibration (see :func:`calibrated_tau`).
        """
        rate = self.false_alarm_rate if false_alarm_rate is None else false_alarm_rate
        return calibrated_tau(self.metadata.get("far_grid", FAR_GRID), self.metadata.get("tau_grid", []), rate)

    def threshold(self, bank: Bank, false_alarm_rate: float | None = None) -> float:
        """The class's threshold on the raw image score: ``location + scale · tau(rate)``."""
        location, scale = (float(v) for v in np.asarray(bank.reference_stats).reshape(2))
        return location + scale * self.tau(false_alarm_rate)

    def compute_bank(self, images: str | Path | Sequence[str | Path] | np.ndarray) -> Bank:
        """Compute the bank of a class from its normal images (files, a folder, or a float [0, 1] array).

        The bank's ``reference_stats`` come from leave-one-out passes of the same two graphs (module
        docstring): k + 1 encoder runs and k single-image scoring runs.

        Returns:
            Bank: tensors + metadata (``num_refs`` = number of images used) + ``reference_stats``.
        """
        batch = as_batch(images, self.image_size)
        scores, maps = [], []
        neutral = np.array([0.0, 1.0, 0.0], dtype=np.float32)  # raw scores: location 0, scale 1, tau 0
        for held, others in leave_one_out_sets(int(batch.shape[0])):
            refs = batch[others] if others is not None else np.ascontiguousarray(batch[held : held + 1, :, :, ::-1])
            outputs = self._score(batch[held : held + 1], self._encode(refs), neutral)
            scores.append(float(np.asarray(outputs["raw_score"]).reshape(-1)[0]))
            maps.append(np.asarray(outputs["raw_map"]))
        stats = reference_statistics(scores, maps)
        return Bank(self._encode(batch), {**self.expected_metadata(), "num_refs": int(batch.shape[0])}, stats)

    def _score(self, batch: np.ndarray, tensors: Sequence[np.ndarray], operating_point: np.ndarray) -> dict:
        outputs = self.model([batch, *tensors, operating_point])
        names = [*self.metadata["output_names"], *self.metadata.get("raw_output_names", [])]
        return {name: outputs[i] for i, name in enumerate(names)}

    def _encode(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs = self.encoder(batch)
        tensors = [np.asarray(outputs[i], dtype=np.float32) for i in range(len(self.metadata["bank_names"]))]
        fraction = float(self.metadata.get("reference_coreset", 1.0))
        if fraction < 1.0:  # the encoder graph returns every reference patch; keep the model's coreset of them
            cosine = self.metadata.get("matching") == "cosine"
            for level in range(len(self.metadata["layers"])):
                tensors[level] = tensors[level][coreset_indices(tensors[level], fraction, cosine)]
        return tensors

    def check_bank(self, bank: Bank) -> None:
        """Raise :class:`BankError` if ``bank`` was built for another model, backbone or image size."""
        bank.check(self.expected_metadata())
        expected = self.metadata["bank_names"]
        if len(bank.tensors) != len(expected):
            msg = f"The bank has {len(bank.tensors)} tensors but this model takes {len(expected)} ({expected})."
            raise BankError(msg)
        for i, tensor in enumerate(bank.tensors):
            shape = self.model.input(i + 1).get_partial_shape()
            if shape.rank.get_length() != tensor.ndim:
                msg = f"bank_{i} has {tensor.ndim} dims; the model expects {shape.rank.get_length()}."
                raise BankError(msg)
            for axis in range(tensor.ndim):
                if shape[axis].is_static and shape[axis].get_length() != tensor.shape[axis]:
                    msg = f"bank_{i} has shape {tuple(tensor.shape)}; the model expects {shape} (another backbone?)."
                    raise BankError(msg)

    def predict(
        self,
        images: str | Path | Sequence[str | Path] | np.ndarray,
        bank: Bank | str | Path | None = None,
        false_alarm_rate: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Score and label images against a bank, at the class's normal-only operating point.

        Args:
            images: files, a folder, or a float [0, 1] ``(N, 3, H, W)`` array (resized to :attr:`image_size`).
            bank (Bank | str | Path | None): the bank or its ``.npz`` file; ``None`` = :attr:`default_bank`.
            false_alarm_rate (float | None): requested share of normal images labelled anomalous; ``None`` =
                the export's (:attr:`false_alarm_rate`).

        Returns:
            dict[str, np.ndarray]: ``pred_score`` ``(N,)``, ``pred_label`` ``(N,)``, ``anomaly_map`` and
            ``pred_mask`` ``(N, 1, H, W)``, as anomalib's post-processor produces them (the label is
            ``raw score > location + scale · tau``), plus ``raw_score`` ``(N,)`` and ``raw_map``, the model's
            scores before the operating point and post-processing.
        """
        bank = self.default_bank if bank is None else bank
        bank = Bank.load(bank) if isinstance(bank, str | Path) else bank
        self.check_bank(bank)
        location, scale = (float(v) for v in np.asarray(bank.reference_stats).reshape(2))
        operating_point = np.array([location, scale, self.tau(false_alarm_rate)], dtype=np.float32)
        return self._score(as_batch(images, self.image_size), bank.tensors, operating_point)

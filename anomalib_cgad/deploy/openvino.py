"""OpenVINO deployment with a swappable reference bank: a new class needs k images, not a re-export.

anomalib's own exporter (``anomalib export --export_type openvino``) writes a single-input IR whose
reference bank is frozen into the graph as constants; anomalib's ``OpenVINOInferencer`` runs it
unchanged. This module adds, next to it, two graphs that make the bank a run-time input:

1. ``bank_encoder.xml``: images (k, 3, H, W) in [0, 1] → the bank tensors of that class
   (pre-processing embedded, as in anomalib's IR).
2. ``bank_model.xml``: image (B, 3, H, W) in [0, 1] + the bank tensors → ``pred_score``, ``pred_label``,
   ``anomaly_map``, ``pred_mask`` (pre- and post-processing embedded).

Onboarding a new class = run ``bank_encoder`` on k normal images, save the bank (``.npz``), pass it to
``bank_model``. Neither step needs torch.

Notes:
    On CPUs with AMX/AVX512-BF16, OpenVINO's CPU plugin defaults to bf16 inference, which moves scores by
    about 3e-2. :class:`BankInferencer` compiles with ``INFERENCE_PRECISION_HINT=f32`` unless told otherwise.

Example:
    >>> from anomalib_cgad.deploy import BankInferencer, export_swappable_bank
    >>> export_dir = export_swappable_bank(model, "exports/cgad")  # doctest: +SKIP
    >>> inferencer = BankInferencer(export_dir)  # doctest: +SKIP
    >>> bank = inferencer.compute_bank(["ref1.png", "ref2.png", "ref3.png", "ref4.png"])  # doctest: +SKIP
    >>> result = inferencer.predict("query.png", bank)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.models.components import AnomalibModule
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

BANK_MODEL = "bank_model"
BANK_ENCODER = "bank_encoder"
METADATA = "bank_metadata.json"
F32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


class BankError(ValueError):
    """A reference bank does not fit the exported model."""


class _BankModel(nn.Module):
    """image + bank tensors → post-processed predictions (the graph exported as ``bank_model``)."""

    def __init__(self, module: AnomalibModule) -> None:
        super().__init__()
        self.pre = module.pre_processor
        self.model = module.model
        self.post = module.post_processor

    def forward(self, image: torch.Tensor, *bank: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = self.model.forward_with_bank(self.pre(image), list(bank))
        batch = self.post(batch) if self.post is not None else batch
        return tuple(value for value in batch if value is not None)


class _BankEncoder(nn.Module):
    """reference images → bank tensors (the graph exported as ``bank_encoder``)."""

    def __init__(self, module: AnomalibModule) -> None:
        super().__init__()
        self.pre = module.pre_processor
        self.model = module.model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.compute_bank(self.pre(images)))


def _output_names(module: AnomalibModule, image: torch.Tensor) -> list[str]:
    with torch.no_grad():
        batch = module.eval()(image)
    return [name for name, value in batch._asdict().items() if value is not None]


def _convert(graph: nn.Module, args: tuple, dynamic_shapes: tuple, input_names, output_names, xml: Path) -> None:
    import openvino as ov

    onnx_path = xml.with_suffix(".onnx")
    torch.onnx.export(
        graph,
        args,
        str(onnx_path),
        dynamo=True,
        opset_version=18,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
    )
    ov.save_model(ov.convert_model(onnx_path), xml)
    onnx_path.unlink()
    for extra in onnx_path.parent.glob(onnx_path.name + ".data"):
        extra.unlink()


def export_swappable_bank(
    module: AnomalibModule,
    export_root: str | Path,
    input_size: tuple[int, int] | None = None,
) -> Path:
    """Export ``bank_encoder`` and ``bank_model`` IRs plus the module's current bank.

    Args:
        module (AnomalibModule): a trained ResAD, MetaAD or CGAD with a bank set (the bank it holds is
            saved as ``bank.npz``, the default for the simple case).
        export_root (str | Path): folder to write into (``<root>/weights/openvino``). An existing export
            there is never overwritten: a ``FileExistsError`` names it.
        input_size (tuple[int, int] | None): fixed (H, W) of the inputs, or ``None`` for dynamic sizes.

    Returns:
        Path: the folder holding ``bank_model.xml``, ``bank_encoder.xml``, ``bank.npz`` and metadata.
    """
    folder = Path(export_root) / "weights" / "openvino"
    targets = [folder / f"{BANK_MODEL}.xml", folder / f"{BANK_ENCODER}.xml", folder / "bank.npz"]
    existing = [str(path) for path in targets if path.exists()]
    if existing:
        msg = f"Refusing to overwrite an existing export: {existing}. Choose another export root."
        raise FileExistsError(msg)
    folder.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    bank = [tensor.detach().cpu() for tensor in module.model.bank_tensors()]
    if not bank or any(tensor.numel() == 0 for tensor in bank):
        msg = "The model holds no reference bank: validate/test it on a class (or call set_reference) first."
        raise BankError(msg)

    height, width = input_size or (256, 256)
    batch, h_dim, w_dim = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    image_dims = {0: batch} if input_size else {0: batch, 2: h_dim, 3: w_dim}
    image = torch.rand(2, 3, height, width)
    output_names = _output_names(module, image)
    bank_names = [f"bank_{i}" for i in range(len(bank))]
    bank_dims = tuple({0: torch.export.Dim(f"rows_{i}")} if t.ndim >= 1 else {} for i, t in enumerate(bank))
    _convert(
        _BankModel(module),
        (image, *bank),
        (image_dims, *bank_dims),
        ["image", *bank_names],
        output_names,
        targets[0],
    )
    refs = torch.rand(2, 3, height, width)
    ref_dims = {0: torch.export.Dim("k")} if input_size else {0: torch.export.Dim("k"), 2: h_dim, 3: w_dim}
    _convert(_BankEncoder(module), (refs,), (ref_dims,), ["images"], bank_names, targets[1])
    save_bank(targets[2], bank, module.model.bank_metadata())
    metadata = {
        "model": type(module).__name__,
        "bank_names": bank_names,
        "output_names": output_names,
        "input_size": list(input_size) if input_size else None,
        **module.model.bank_metadata(),
    }
    (folder / METADATA).write_text(json.dumps(metadata, indent=2))
    return folder


def save_bank(path: str | Path, bank: Sequence[torch.Tensor | np.ndarray], metadata: dict) -> Path:
    """Save a bank as ``.npz`` (plain arrays + a JSON metadata string); refuses to overwrite a file."""
    path = Path(path)
    if path.exists():
        msg = f"Refusing to overwrite existing bank file '{path}'."
        raise FileExistsError(msg)
    arrays = {f"bank_{i}": np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t) for i, t in enumerate(bank)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, __metadata__=np.array(json.dumps(metadata)), **arrays)
    return path


def load_bank(path: str | Path) -> tuple[list[np.ndarray], dict]:
    """Load a bank written by :func:`save_bank` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        msg = f"Bank file '{path}' does not exist."
        raise FileNotFoundError(msg)
    try:
        with np.load(path, allow_pickle=False) as data:
            metadata = json.loads(str(data["__metadata__"]))
            names = sorted((k for k in data.files if k.startswith("bank_")), key=lambda k: int(k.split("_")[1]))
            arrays = [data[name] for name in names]
    except (ValueError, KeyError, OSError) as exc:
        msg = f"'{path}' is not a reference bank file written by anomalib-cgad: {exc}"
        raise BankError(msg) from exc
    return arrays, metadata


def _load_images(images: Sequence[str | Path] | np.ndarray, input_size: Sequence[int] | None) -> np.ndarray:
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32)
        return array[None] if array.ndim == 3 else array
    loaded = []
    for path in images:
        path = Path(path)
        if not path.is_file():
            msg = f"Image '{path}' does not exist."
            raise FileNotFoundError(msg)
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
                if input_size:
                    rgb = rgb.resize((int(input_size[1]), int(input_size[0])), Image.BILINEAR)
                loaded.append(np.asarray(rgb, dtype=np.float32) / 255.0)
        except OSError as exc:
            msg = f"Could not read image '{path}': {exc}"
            raise ValueError(msg) from exc
    sizes = {array.shape for array in loaded}
    if len(sizes) > 1:
        msg = f"Images have different sizes {sorted(sizes)}; export with a fixed input_size or resize them first."
        raise ValueError(msg)
    return np.stack(loaded).transpose(0, 3, 1, 2)


class BankInferencer:
    """Run the exported ``bank_model`` with any bank, and build banks with ``bank_encoder``, torch-free.

    Args:
        path (str | Path): the folder written by :func:`export_swappable_bank`.
        device (str): OpenVINO device. Defaults to ``"CPU"``.
        config (dict | None): OpenVINO compile config. Defaults to ``{"INFERENCE_PRECISION_HINT": "f32"}``.
    """

    def __init__(self, path: str | Path, device: str = "CPU", config: dict | None = None) -> None:
        import openvino as ov

        folder = Path(path)
        if (folder / "weights" / "openvino").is_dir():
            folder = folder / "weights" / "openvino"
        meta_file = folder / METADATA
        if not meta_file.is_file():
            msg = f"'{folder}' holds no swappable-bank export ({METADATA} missing); run export_swappable_bank first."
            raise FileNotFoundError(msg)
        self.folder = folder
        self.metadata = json.loads(meta_file.read_text())
        core = ov.Core()
        config = F32_CONFIG if config is None else config
        self.model = core.compile_model(folder / f"{BANK_MODEL}.xml", device, config)
        self.encoder = core.compile_model(folder / f"{BANK_ENCODER}.xml", device, config)

    @property
    def default_bank(self) -> list[np.ndarray]:
        """The bank that was held by the model at export time."""
        return load_bank(self.folder / "bank.npz")[0]

    def compute_bank(self, images: Sequence[str | Path] | np.ndarray) -> list[np.ndarray]:
        """Compute the bank of a class from its k normal images (paths or float [0,1] NCHW array)."""
        array = _load_images(images, self.metadata.get("input_size"))
        outputs = self.encoder(array)
        return [outputs[i] for i in range(len(self.metadata["bank_names"]))]

    def _check_bank(self, bank: Sequence[np.ndarray]) -> None:
        expected = self.metadata["bank_names"]
        if len(bank) != len(expected):
            msg = f"The bank has {len(bank)} tensors but this model takes {len(expected)} ({expected})."
            raise BankError(msg)
        for i, tensor in enumerate(bank):
            port = self.model.input(i + 1).get_partial_shape()
            if port.rank.get_length() != tensor.ndim:
                msg = f"bank_{i} has {tensor.ndim} dims; the model expects {port.rank.get_length()}."
                raise BankError(msg)
            for axis in range(1, tensor.ndim):
                if port[axis].is_static and port[axis].get_length() != tensor.shape[axis]:
                    msg = (
                        f"bank_{i} has shape {tuple(tensor.shape)}; the model expects {port[axis].get_length()} "
                        f"at axis {axis}: the bank was built with another backbone or layers."
                    )
                    raise BankError(msg)
            if not np.isfinite(tensor).all():
                msg = f"bank_{i} holds NaN or inf values."
                raise BankError(msg)

    def predict(self, images: Sequence[str | Path] | np.ndarray | str | Path, bank: Sequence[np.ndarray]) -> dict:
        """Score images against a bank; returns ``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask``."""
        if isinstance(images, str | Path):
            images = [images]
        self._check_bank(bank)
        array = _load_images(images, self.metadata.get("input_size"))
        outputs = self.model([array, *[np.asarray(t, dtype=np.float32) for t in bank]])
        return {name: outputs[i] for i, name in enumerate(self.metadata["output_names"])}

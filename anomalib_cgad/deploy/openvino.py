"""OpenVINO export with a swappable reference bank: a new class needs k images, not a re-export.

anomalib's own exporter (``anomalib export --export_type openvino``) writes a single-input IR,
``model.xml``, whose reference bank is frozen into the graph as constants; anomalib's
``OpenVINOInferencer`` runs it unchanged. :func:`export_swappable_bank` writes, next to it, two graphs that
make the bank a run-time input:

1. ``bank_encoder.xml``: k images ``(k, 3, H, W)`` in [0, 1] → the bank tensors of that class
   (pre-processing embedded; for CGAD this includes the references' leave-one-out normaliser ``scale = (mu, sigma)``);
2. ``bank_model.xml``: images ``(B, 3, H, W)`` in [0, 1] + the bank tensors (each with a dynamic row count)
   + ``operating_point = (location, scale, tau)`` → ``pred_score``, ``pred_label``, ``anomaly_map``,
   ``pred_mask`` (pre- and post-processing embedded; scores are ``(raw − location) / scale − tau`` before the
   post-processor, whose threshold is 0) and ``raw_score``, ``raw_map`` (before the operating point, which
   the inferencer's leave-one-out pass needs);
3. ``bank.npz`` (the bank held at export time) and ``bank_metadata.json`` (with the model's calibration
   ``far_grid`` / ``tau_grid`` and its ``false_alarm_rate``).

:class:`~anomalib_cgad.deploy.inferencer.BankInferencer` runs them without torch. The ``.npz`` bank format
is shared with the torch models: ``model.save_bank`` / ``model.load_bank`` (or
:func:`~anomalib_cgad.components.reference_bank.save_model_bank` / ``load_model_bank``) move banks between a
Lightning module and a file, so a bank computed by the deployed encoder can be loaded into torch and
vice versa.

Example:
    >>> from anomalib_cgad.deploy import BankInferencer, export_swappable_bank
    >>> folder = export_swappable_bank(model, "exports/cgad")  # doctest: +SKIP
    >>> inferencer = BankInferencer(folder)  # doctest: +SKIP
    >>> bank = inferencer.compute_bank("new_product/good")  # doctest: +SKIP
    >>> inferencer.predict("query.png", bank)["pred_score"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from anomalib.models.components import AnomalibModule
from torch import nn

from anomalib_cgad.components.operating_point import apply_operating_point
from anomalib_cgad.components.reference_bank import model_bank, module_image_size
from anomalib_cgad.deploy.inferencer import (
    BANK_ENCODER,
    BANK_FILE,
    BANK_MODEL,
    IR_KEY,
    METADATA,
    OPERATING_POINT,
    Bank,
    BankError,
    ir_digest,
)

logger = logging.getLogger(__name__)

OPSET = 18
# An ONNX file that only feeds ov.convert_model skips onnxscript's optimiser: OpenVINO folds and fuses the graph
# itself, and the optimiser's pattern matching was 35-50 % of each bank graph's export time (bank_model 27 s ->
# 20 s, bank_encoder 16 s -> 8 s, ResAD, benchmarks/results/export_time). ``verbose=False`` drops the exporter's
# eight progress lines per graph.
ONNX_FOR_OPENVINO = {"optimize": False, "verbose": False}


class _BankModel(nn.Module):
    """image + bank tensors → post-processed predictions (the graph exported as ``bank_model``)."""

    def __init__(self, module: AnomalibModule) -> None:
        super().__init__()
        self.pre = module.pre_processor
        self.model = module.model
        self.post = module.post_processor
        self.training = module.model.training  # the wrapper's own flag only (the exporter warns on it)

    def forward(self, image: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *bank, operating_point = inputs
        batch = self.pre(image) if self.pre is not None else image
        raw = self.model.forward_with_bank(batch, list(bank))
        batch = apply_operating_point(raw, operating_point)
        batch = self.post(batch) if self.post is not None else batch
        return (*(value for value in batch if value is not None), raw.pred_score, raw.anomaly_map)


class _BankEncoder(nn.Module):
    """reference images → bank tensors (the graph exported as ``bank_encoder``)."""

    def __init__(self, module: AnomalibModule) -> None:
        super().__init__()
        self.pre = module.pre_processor
        self.model = module.model
        self.training = module.model.training  # the wrapper's own flag only (the exporter warns on it)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = self.pre(images) if self.pre is not None else images
        return tuple(self.model.compute_bank(images))


def _convert(
    graph: nn.Module,
    args: tuple,
    dynamic_shapes: tuple,
    input_names: list[str],
    output_names: list[str],
    xml: Path,
    compress_to_fp16: bool,
) -> None:
    import openvino as ov

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / (xml.stem + ".onnx")
        torch.onnx.export(
            graph,
            args,
            str(onnx_path),
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            **ONNX_FOR_OPENVINO,
        )
        ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=compress_to_fp16)


RAW_OUTPUT_NAMES = ("raw_score", "raw_map")  # bank_model outputs before the operating point; not in model.xml


def single_input_ir(bank_model_xml: str | Path, bank: Bank, operating_point: np.ndarray):
    """anomalib's single-input IR (``model.xml``), made from ``bank_model.xml`` by freezing the bank inputs.

    anomalib's exporter would trace the Lightning module a third time (pre-processor, model with the bank as
    constants, post-processor: the same graph as ``bank_model`` with the bank bound). Binding the bank tensors
    and the class's operating point ``(location, scale, tau)`` to the bank graph's inputs as OpenVINO constants
    gives that graph in 0.1 s instead of one more trace + ONNX + conversion (the largest share of the export
    time, ``benchmarks/results/export_time``). Input ``input`` (anomalib's name, ``(B, 3, H, W)`` in [0, 1]);
    outputs named as anomalib names them (the bank graph's raw score and map outputs are left out).

    Returns:
        openvino.Model: the single-input model, not yet saved.
    """
    import openvino as ov
    import openvino.opset13 as ops

    model = ov.Core().read_model(str(bank_model_xml))
    image, *inputs = model.get_parameters()
    bank_inputs = [p for p in inputs if OPERATING_POINT not in p.output(0).get_names()]
    point_inputs = [p for p in inputs if OPERATING_POINT in p.output(0).get_names()]
    if len(bank_inputs) != len(bank.tensors) or len(point_inputs) != 1:
        msg = (
            f"{bank_model_xml} takes {len(bank_inputs)} bank tensors and {len(point_inputs)} operating point(s); "
            f"the bank has {len(bank.tensors)} tensors and one operating point."
        )
        raise BankError(msg)
    values = [*bank.tensors, operating_point]
    for parameter, tensor in zip([*bank_inputs, *point_inputs], values, strict=True):
        constant = ops.constant(np.ascontiguousarray(tensor, dtype=np.float32))
        for target in list(parameter.output(0).get_target_inputs()):
            target.replace_source_output(constant.output(0))
        model.remove_parameter(parameter)
    for result in list(model.get_results()):
        if result.output(0).get_names() & set(RAW_OUTPUT_NAMES):
            model.remove_result(result)
    model.validate_nodes_and_infer_types()
    image.output(0).get_tensor().set_names({"input"})
    image.set_friendly_name("input")
    return model


def swappable_targets(export_root: str | Path) -> list[Path]:
    """The files :func:`export_swappable_bank` writes under ``export_root``."""
    folder = Path(export_root) / "weights" / "openvino"
    return [
        folder / f"{BANK_MODEL}.xml",
        folder / f"{BANK_MODEL}.bin",
        folder / f"{BANK_ENCODER}.xml",
        folder / f"{BANK_ENCODER}.bin",
        folder / BANK_FILE,
        folder / METADATA,
    ]


def export_swappable_bank(
    module: AnomalibModule,
    export_root: str | Path,
    input_size: tuple[int, int] | None = None,
    compress_to_fp16: bool = False,
    ir: str | Path | None = None,
    anomalib_ir: str | None = None,
) -> Path:
    """Export ``bank_encoder`` and ``bank_model`` IRs plus the module's current bank.

    Args:
        module (AnomalibModule): a ResAD, MetaAD or CGAD holding a bank (saved as ``bank.npz``).
        export_root (str | Path): folder to write into (``<root>/weights/openvino``, as anomalib does). An
            existing swappable export there is never overwritten: a ``FileExistsError`` names it.
        input_size (tuple[int, int] | None): fixed ``(H, W)`` of the graphs' inputs, or ``None`` for dynamic
            sizes. Defaults to ``None``.
        compress_to_fp16 (bool): store the weights as FP16 (``--compression_type FP16``). Defaults to ``False``.
        ir (str | Path | None): anomalib's ``model.xml`` written in the same folder by the same export; its
            digest goes into the metadata so :class:`BankInferencer` refuses these bank graphs once another
            export replaced it. Defaults to ``None`` (bank graphs on their own).
        anomalib_ir (str | None): also write anomalib's single-input IR under this name (``"model"`` →
            ``model.xml``), derived from ``bank_model`` (:func:`single_input_ir`), and record it as ``ir``.
            Defaults to ``None``.

    Returns:
        Path: the folder holding ``bank_model.xml``, ``bank_encoder.xml``, ``bank.npz`` and metadata.

    Raises:
        FileExistsError: an export already exists there.
        BankError: the model holds no bank.
    """
    targets = swappable_targets(export_root)
    existing = [str(path) for path in targets if path.exists()]
    if existing:
        msg = f"Refusing to overwrite an existing export: {existing}. Choose another export root."
        raise FileExistsError(msg)
    was_training = module.training
    module = module.eval()
    device = next(module.parameters()).device
    bank = model_bank(module)
    folder = targets[0].parent
    folder.mkdir(parents=True, exist_ok=True)

    # With dynamic sizes the example must differ from the Resize target: an example of exactly that size
    # makes torchvision skip the resize, the export specialises on it and falls back to a slow strategy.
    height, width = input_size or [size + 32 for size in module_image_size(module)]
    batch, h_dim, w_dim = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    image_dims = {0: batch} if input_size else {0: batch, 2: h_dim, 3: w_dim}
    image = torch.rand(2, 3, height, width, device=device)
    with torch.no_grad():
        output_names = [name for name, value in module(image)._asdict().items() if value is not None]
    bank_names = [f"bank_{i}" for i in range(len(bank.tensors))]
    # Bank levels (rows, C) get a dynamic row count (k·H·W patches); CGAD's (2,) scale (mu, sigma) stays static.
    bank_dims = tuple({0: torch.export.Dim(f"rows_{i}")} if t.ndim == 2 else None for i, t in enumerate(bank.tensors))
    bank_args = tuple(torch.from_numpy(t).to(device) for t in bank.tensors)
    operating_point = module.operating_point.vector(module.false_alarm_rate).to(device)
    raw_output_names = list(RAW_OUTPUT_NAMES)
    with torch.no_grad():
        _convert(
            _BankModel(module),
            (image, *bank_args, operating_point),
            (image_dims, (*bank_dims, None)),
            ["image", *bank_names, OPERATING_POINT],
            [*output_names, *raw_output_names],
            targets[0],
            compress_to_fp16,
        )
        k_dim = torch.export.Dim("k")
        refs = torch.rand(2, 3, height, width, device=device)
        ref_dims = {0: k_dim} if input_size else {0: k_dim, 2: h_dim, 3: w_dim}
        _convert(_BankEncoder(module), (refs,), (ref_dims,), ["images"], bank_names, targets[2], compress_to_fp16)
    bank.save(targets[4])
    metadata = {
        **{key: value for key, value in bank.metadata.items() if key != "num_refs"},
        "k_shot": int(getattr(module, "k_shot", bank.metadata.get("num_refs", 1))),
        "bank_names": bank_names,
        "output_names": output_names,
        "raw_output_names": raw_output_names,
        "false_alarm_rate": float(module.false_alarm_rate),
        "far_grid": module.operating_point.far_grid.tolist(),
        "tau_grid": module.operating_point.tau_grid.tolist(),
        "calibrated_k": int(module.operating_point.calibrated_k),
        "input_size": list(input_size) if input_size else None,
    }
    if anomalib_ir is not None:
        import openvino as ov

        ir = folder / f"{anomalib_ir}.xml"
        point = operating_point.detach().cpu().float().numpy()
        ov.save_model(single_input_ir(targets[0], bank, point), ir, compress_to_fp16=compress_to_fp16)
    if ir is not None:
        metadata[IR_KEY] = {"file": Path(ir).name, "sha256": ir_digest(ir)}
    targets[5].write_text(json.dumps(metadata, indent=2))
    module.train(was_training)
    logger.info("Exported swappable-bank graphs to %s", folder)
    return folder

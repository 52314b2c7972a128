"""Make ``anomalib export --export_type openvino`` also write the swappable-bank graphs, with no extra flag.

:class:`BankExportMixin` is listed first in the bases of ``ResAD``, ``MetaAD`` and ``CGAD``. It overrides two
methods of anomalib's own ``ExportMixin``:

1. ``to_onnx``: defaults to ``opset_version=18`` (what the dynamo exporter emits; anomalib's default 14
   prints a harmless but noisy down-conversion traceback);
2. ``to_openvino``: refuses to overwrite an existing export, runs anomalib's exporter unchanged
   (``model.xml``, bank frozen as constants, for anomalib's ``OpenVINOInferencer``), then writes
   ``bank_model.xml``, ``bank_encoder.xml``, ``bank.npz`` and ``bank_metadata.json`` next to it
   (:func:`anomalib_cgad.deploy.export_swappable_bank`).

Example:
    >>> class CGAD(BankExportMixin, ReferenceMixin, AnomalibModule): ...  # doctest: +SKIP

    $ anomalib export --model CGAD --export_type openvino --ckpt_path <run>/weights/lightning/model.ckpt \\
        --default_root_dir exports/cgad
    # -> exports/cgad/weights/openvino/{model,bank_model,bank_encoder}.{xml,bin}, bank.npz, bank_metadata.json
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from anomalib.deploy import CompressionType

from anomalib_cgad.deploy.openvino import OPSET, export_swappable_bank, swappable_targets

logger = logging.getLogger(__name__)


class BankExportMixin:
    """OpenVINO export of anomalib's single-input IR *and* the swappable-bank graphs (see module docstring)."""

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """anomalib's ONNX export with ``opset_version`` defaulting to 18.

        Args:
            export_root (Path | str): output folder (``<root>/weights/onnx``).
            model_file_name (str): file name without suffix. Defaults to ``"model"``.
            input_size (tuple[int, int] | None): fixed ``(H, W)`` or ``None`` for dynamic. Defaults to ``None``.
            **kwargs: passed to ``torch.onnx.export``.

        Returns:
            Path: the ``.onnx`` file.
        """
        kwargs.setdefault("opset_version", OPSET)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Path:
        """anomalib's OpenVINO export, then the swappable-bank graphs in the same folder.

        Args:
            export_root (Path | str): output folder (``<root>/weights/openvino``).
            model_file_name (str): name of anomalib's IR. Defaults to ``"model"``.
            input_size (tuple[int, int] | None): fixed ``(H, W)`` or ``None`` for dynamic. Defaults to ``None``.
            compression_type (CompressionType | None): anomalib's compression. ``FP16`` also applies to the
                bank graphs; the INT8 variants apply to ``model.xml`` only. Defaults to ``None``.
            *args: anomalib's other arguments (``datamodule``, ``metric``, ``task``, ``max_drop``, ...).
            **kwargs: anomalib's other keyword arguments (``ov_kwargs``, ``onnx_kwargs``).

        Returns:
            Path: anomalib's ``model.xml`` (the bank graphs sit next to it).

        Raises:
            FileExistsError: an export already exists in ``<export_root>/weights/openvino``.
        """
        folder = Path(export_root) / "weights" / "openvino"
        existing = [str(p) for p in [folder / f"{model_file_name}.xml", *swappable_targets(export_root)] if p.exists()]
        if existing:
            msg = f"Refusing to overwrite an existing export: {existing}. Choose another export root."
            raise FileExistsError(msg)
        path = super().to_openvino(  # type: ignore[misc]
            export_root, model_file_name, input_size, compression_type, *args, **kwargs
        )
        if compression_type not in {None, CompressionType.FP16}:
            logger.info("%s applies to %s only; the bank graphs stay FP32.", compression_type, path.name)
        export_swappable_bank(
            self,  # type: ignore[arg-type]
            export_root,
            input_size=input_size,
            compress_to_fp16=compression_type == CompressionType.FP16,
        )
        return path

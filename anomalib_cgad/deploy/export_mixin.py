"""Make ``anomalib export --export_type openvino`` also write the swappable-bank graphs, with no extra flag.

:class:`BankExportMixin` is listed first in the bases of ``ResAD``, ``MetaAD`` and ``CGAD``. It overrides two
methods of anomalib's own ``ExportMixin``:

1. ``to_onnx``: defaults to ``opset_version=18`` (what the dynamo exporter emits; anomalib's default 14
   prints a harmless but noisy down-conversion traceback);
2. ``to_openvino``: writes ``bank_model.xml``, ``bank_encoder.xml``, ``bank.npz`` and ``bank_metadata.json``
   (:func:`anomalib_cgad.deploy.export_swappable_bank`) and anomalib's single-input ``model.xml`` (bank frozen as
   constants, for anomalib's ``OpenVINOInferencer``). ``model.xml`` is the bank graph with its bank inputs bound
   to constants (:func:`~anomalib_cgad.deploy.openvino.single_input_ir`), which saves anomalib's third trace of
   the same graph; with INT8 compression or the user's own ``ov_kwargs`` / ``onnx_kwargs`` it comes from
   anomalib's exporter instead. The metadata names the digest of that ``model.xml``, so a built-in model
   exported into the same root later leaves bank graphs that :class:`~anomalib_cgad.deploy.BankInferencer`
   refuses instead of a folder that looks valid.

``to_torch``, ``to_onnx`` and ``to_openvino`` replace a previous export in the same root, as anomalib's models
do, but write the new one beside it first and swap it in whole (:mod:`anomalib_cgad.deploy.replace`), logging
what they replaced.

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

from anomalib_cgad.deploy.openvino import OPSET, export_swappable_bank
from anomalib_cgad.deploy.replace import write_aside_then_swap

logger = logging.getLogger(__name__)


class BankExportMixin:
    """OpenVINO export of anomalib's single-input IR *and* the swappable-bank graphs (see module docstring)."""

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """anomalib's torch export (``<root>/weights/torch/model.pt``), replacing a previous one whole."""
        parent = super()
        return write_aside_then_swap(
            export_root,
            "torch",
            lambda root: parent.to_torch(root, model_file_name),  # type: ignore[misc]
        )

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
        kwargs.setdefault("verbose", False)  # the dynamo exporter's progress lines say nothing to a user
        parent = super()
        return write_aside_then_swap(
            export_root,
            "onnx",
            lambda root: parent.to_onnx(root, model_file_name, input_size, **kwargs),  # type: ignore[misc]
        )

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
        """
        parent = super()
        fp16 = compression_type == CompressionType.FP16
        # anomalib's exporter is needed only for what the bank graph cannot give: INT8 compression (NNCF on
        # anomalib's IR) and the user's own ov_kwargs / onnx_kwargs for that IR.
        anomalib_path = compression_type not in {None, CompressionType.FP16} or any(
            kwargs.get(key) for key in ("ov_kwargs", "onnx_kwargs")
        )

        def write(root: Path) -> Path:
            if not anomalib_path:
                folder = export_swappable_bank(
                    self,  # type: ignore[arg-type]
                    root,
                    input_size=input_size,
                    compress_to_fp16=fp16,
                    anomalib_ir=model_file_name,
                )
                return folder / f"{model_file_name}.xml"
            path = parent.to_openvino(  # type: ignore[misc]
                root, model_file_name, input_size, compression_type, *args, **kwargs
            )
            if not fp16 and compression_type is not None:
                logger.info("%s applies to %s only; the bank graphs stay FP32.", compression_type, path.name)
            export_swappable_bank(self, root, input_size=input_size, compress_to_fp16=fp16, ir=path)  # type: ignore[arg-type]
            return path

        return write_aside_then_swap(export_root, "openvino", write)

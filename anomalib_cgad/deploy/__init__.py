"""Deployment: OpenVINO export with a swappable reference bank, and a torch-free inferencer.

- :class:`BankExportMixin`: ``anomalib export --export_type openvino`` writes anomalib's ``model.xml`` plus
  ``bank_model.xml`` / ``bank_encoder.xml`` / ``bank.npz``.
- :func:`export_swappable_bank`: the same bank graphs from Python.
- :class:`BankInferencer` and :class:`Bank` (``inferencer.py``: numpy, Pillow, openvino only): compute a
  new class's bank from k images, score images against any bank.
- :func:`save_model_bank` / :func:`load_model_bank`: the same ``.npz`` bank file in and out of torch models.

Example:
    >>> from anomalib_cgad.deploy import BankInferencer
    >>> inferencer = BankInferencer("exports/cgad")  # doctest: +SKIP
    >>> bank = inferencer.compute_bank("new_product/good")  # doctest: +SKIP
    >>> inferencer.predict("query.png", bank)["pred_score"]  # doctest: +SKIP
"""

from anomalib_cgad.deploy.export_mixin import BankExportMixin
from anomalib_cgad.deploy.inferencer import F32_CONFIG, Bank, BankError, BankInferencer
from anomalib_cgad.deploy.openvino import (
    export_swappable_bank,
    load_model_bank,
    model_bank,
    save_model_bank,
    set_model_bank,
)

__all__ = [
    "F32_CONFIG",
    "Bank",
    "BankError",
    "BankExportMixin",
    "BankInferencer",
    "export_swappable_bank",
    "load_model_bank",
    "model_bank",
    "save_model_bank",
    "set_model_bank",
]

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

from __future__ import annotations

from anomalib_cgad.lazy import lazy_attributes

# Names resolved on first access (PEP 562) -> their module. ``inferencer`` needs numpy, Pillow and openvino
# only; ``export_mixin`` and ``openvino`` need torch and anomalib, so importing them here would make
# ``from anomalib_cgad.deploy import BankInferencer`` (and every ``anomalib_cgad.deploy.*`` import) need torch.
_LAZY = {
    "BankExportMixin": "anomalib_cgad.deploy.export_mixin",
    "F32_CONFIG": "anomalib_cgad.deploy.inferencer",
    "Bank": "anomalib_cgad.deploy.inferencer",
    "BankError": "anomalib_cgad.errors",
    "BankInferencer": "anomalib_cgad.deploy.inferencer",
    "export_swappable_bank": "anomalib_cgad.deploy.openvino",
    "load_model_bank": "anomalib_cgad.components.reference_bank",
    "model_bank": "anomalib_cgad.components.reference_bank",
    "save_model_bank": "anomalib_cgad.components.reference_bank",
    "set_model_bank": "anomalib_cgad.components.reference_bank",
}
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


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)

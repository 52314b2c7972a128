"""Datamodules for class-generalizable anomaly detection.

- :class:`CrossClass`: train on source classes, test on unseen target classes with k references.
- :class:`ELPV` / :class:`ELPVDataset`: ELPV solar cells (optional extra), cell type as the class.
- :func:`make_synthetic_mvtec`: small generated MVTecAD-format datasets.
"""

from anomalib_cgad.data.cross_class import CrossClass
from anomalib_cgad.data.elpv import ELPV, ELPVDataset
from anomalib_cgad.data.synthetic import make_synthetic_mvtec

__all__ = ["ELPV", "CrossClass", "ELPVDataset", "make_synthetic_mvtec"]

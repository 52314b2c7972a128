"""The anomalib-cgad models: ResAD, MetaAD and CGAD (each a direct subclass of ``AnomalibModule``)."""

from anomalib_cgad.models.cgad import CGAD
from anomalib_cgad.models.metaad import MetaAD
from anomalib_cgad.models.resad import ResAD

__all__ = ["CGAD", "MetaAD", "ResAD"]

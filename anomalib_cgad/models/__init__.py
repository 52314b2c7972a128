"""The anomalib-cgad models: ResAD, MetaAD and CGAD (each a direct subclass of ``AnomalibModule``).

Importing this package registers them with anomalib (:func:`anomalib_cgad.registry.register`): the start-up
hook imports it right after ``anomalib.models``, and ``anomalib_cgad.CGAD`` imports it on first use.
"""

from anomalib_cgad.models.cgad import CGAD
from anomalib_cgad.models.metaad import MetaAD
from anomalib_cgad.models.resad import ResAD
from anomalib_cgad.registry import register

__all__ = ["CGAD", "MetaAD", "ResAD"]

register(ResAD, MetaAD, CGAD)

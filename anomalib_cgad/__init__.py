"""anomalib-cgad: class-generalizable anomaly detection models for anomalib.

Train one model on some product classes, then detect defects in a class it has never seen, given only
a few normal reference images of that class and no retraining.

Models (each a direct subclass of ``anomalib.models.AnomalibModule``):

- :class:`CGAD`: ResAD residuals trained with the multi-directional meta-learning outer loop (the default).
- :class:`ResAD`: residual-feature distribution learning (Yao et al., NeurIPS 2024).
- :class:`MetaAD`: multi-directional meta-learning (Roy et al., arXiv 2601.19833) on image patch features.

After ``pip install anomalib-cgad`` they are found by ``anomalib train --model CGAD`` and
``anomalib.models.get_model("cgad")`` with no extra flag (see ``_anomalib_cgad_hook``).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_cgad import CGAD
    >>> from anomalib_cgad.data import CrossClass
    >>> datamodule = CrossClass(source_dataset="ELPV", source_categories=["mono"], target_categories=["poly"])
    >>> Engine(max_epochs=4).train(CGAD(), datamodule=datamodule)  # doctest: +SKIP
"""

from anomalib_cgad.console import quiet_lightning_tips
from anomalib_cgad.models import CGAD, MetaAD, ResAD
from anomalib_cgad.registry import register

__version__ = "0.1.0"
__all__ = ["CGAD", "MetaAD", "ResAD", "__version__"]

register(ResAD, MetaAD, CGAD)
quiet_lightning_tips()

"""CGAD: class-generalizable anomaly detection with ResAD residuals and multi-directional meta-learning.

The default model of anomalib-cgad: ResAD's residual representation (features minus their nearest patch
among k normal references of the same class → constraintor → conditional flow), trained in episodes
whose inner level fits the normal residual distribution and whose outer level calibrates the decision
(softmax confidence margin between normals and a few anomalies), rotating which training classes play
which role. Scores are normalised by the references, so thresholds transfer to unseen classes.

Example:
    >>> from anomalib_cgad import CGAD
    >>> model = CGAD(k_shot=4)  # doctest: +SKIP

Papers: ResAD https://arxiv.org/abs/2410.20047 ; multi-directional meta-learning https://arxiv.org/abs/2601.19833
"""

from .lightning_model import CGAD

__all__ = ["CGAD"]

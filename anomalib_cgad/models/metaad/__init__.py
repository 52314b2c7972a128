"""MetaAD: multi-directional meta-learning for class-generalizable anomaly detection, on image patches.

Inner level: a per-patch encoder and a bounded normality head learn the manifold of normal patches
(residuals against k references of the same class, by default). Outer level: the head and a learned
softmax temperature are calibrated, after one ODIN step, to maximise the confidence margin between normal
(ID) patches and a few anomalous (OOD) ones, over episodes that rotate which classes play which role.

Example:
    >>> from anomalib_cgad import MetaAD
    >>> from anomalib_cgad.models.episodic import EpisodeOptions
    >>> model = MetaAD(backbone_weights=None, episodes=EpisodeOptions(outer=False))  # the inner-only ablation
    >>> model.outer
    False

Paper: https://arxiv.org/abs/2601.19833
"""

from .lightning_model import MetaAD

__all__ = ["MetaAD"]

"""Shared building blocks of the anomalib-cgad models: one of each concept.

- :mod:`~anomalib_cgad.components.backbone`: the frozen multi-scale feature extractor.
- :mod:`~anomalib_cgad.components.reference_bank`: k-shot reference features and nearest-neighbour residuals.
- :mod:`~anomalib_cgad.components.flow`: the conditional normalizing flow.
- :mod:`~anomalib_cgad.components.episodes`: the meta-learning episode sampler.
- :mod:`~anomalib_cgad.components.distribution_matching`: ResAD++'s residual codebook and EFDM matching.
- :mod:`~anomalib_cgad.components.bank_model`: the contract of the torch models scored against k references.
- :mod:`~anomalib_cgad.components.anomaly_map`: per-level patch scores → smoothed anomaly map.
- :mod:`~anomalib_cgad.components.residual_loss`: ResAD's constraintor and flow losses (CGAD reuses them).
- :mod:`~anomalib_cgad.components.operating_point`: the normal-only per-class operating point.
- :mod:`~anomalib_cgad.components.training_pool`, :mod:`~anomalib_cgad.components.confidence_margin`,
  :mod:`~anomalib_cgad.components.patch_knn`: training features once, the outer-level loss, the patch-kNN score.
"""

from anomalib_cgad.components.backbone import BackboneWeightsError, FeatureExtractor

__all__ = ["BackboneWeightsError", "FeatureExtractor"]

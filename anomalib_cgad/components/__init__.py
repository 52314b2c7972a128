"""Shared building blocks of the anomalib-cgad models: one of each concept.

- :mod:`~anomalib_cgad.components.backbone`: the frozen multi-scale feature extractor.
- :mod:`~anomalib_cgad.components.reference_bank`: k-shot reference features and nearest-neighbour residuals.
- :mod:`~anomalib_cgad.components.flow`: the conditional normalizing flow.
- :mod:`~anomalib_cgad.components.episodes`: the meta-learning episode sampler.
- :mod:`~anomalib_cgad.components.distribution_matching`: ResAD++'s residual codebook and EFDM matching.
"""

from anomalib_cgad.components.backbone import BackboneWeightsError, FeatureExtractor

__all__ = ["BackboneWeightsError", "FeatureExtractor"]

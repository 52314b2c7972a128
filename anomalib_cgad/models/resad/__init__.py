"""ResAD: a simple framework for class-generalizable anomaly detection (Yao et al., NeurIPS 2024).

Residual features (a patch feature minus its nearest patch among k normal references of the same class)
vary far less across classes than the features themselves; ResAD learns their distribution with a
feature constraintor and a conditional normalizing flow, and detects anomalies in unseen classes from
their k references without retraining.

Example:
    >>> from anomalib_cgad import ResAD
    >>> model = ResAD(preset="paper", k_shot=4)  # doctest: +SKIP

Paper: https://arxiv.org/abs/2410.20047
"""

from .lightning_model import ResAD

__all__ = ["ResAD"]

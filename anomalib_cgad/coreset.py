"""Greedy k-center coreset of a reference bank level (numpy only, so both sides of the plugin share it).

The torch models (:class:`~anomalib_cgad.components.reference_bank.ReferenceBank`) and the torch-free
OpenVINO inferencer (:class:`~anomalib_cgad.deploy.inferencer.BankInferencer`) must keep exactly the same
rows of a bank, so they call the same function. It lives in this leaf module, below both: importing it needs
neither torch nor the deployment package.

Example:
    >>> import numpy as np
    >>> from anomalib_cgad.coreset import coreset_indices
    >>> coreset_indices(np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]]), 0.5).tolist()
    [0, 3]
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_coreset_fraction", "coreset_indices"]


def check_coreset_fraction(fraction: float) -> None:
    """Raise ``ValueError`` unless ``fraction`` (the share of reference patches a bank keeps) lies in ``(0, 1]``."""
    if not 0.0 < fraction <= 1.0:
        msg = f"The bank coreset (bank.coreset) must lie in (0, 1], got {fraction}."
        raise ValueError(msg)


def coreset_indices(rows: np.ndarray, fraction: float, cosine: bool = False) -> np.ndarray:
    """Rows to keep of a reference bank level: a greedy k-center coreset of ``ceil(fraction · M)`` rows.

    Each step adds the row farthest from the rows already kept (Sener & Savarese, 2018), so every dropped
    reference patch has a kept one close to it and the nearest-reference search gets ``1/fraction`` times
    cheaper while the residual of a normal query grows little. Deterministic: it starts from row 0 and takes
    the first row on ties, so the same references always give the same bank. With ``cosine`` the distances are
    those of the unit-normalised rows (the geometry of cosine matching). Written in numpy so the torch-free
    :class:`~anomalib_cgad.deploy.inferencer.BankInferencer` selects exactly the rows the torch models select
    (both call this function).

    (anomalib's ``KCenterGreedy`` is the same greedy for PatchCore's memory bank, but it needs torch, starts
    from a random row and projects rows to ~180 dimensions, more than the 40-112 channels of a bank level.)

    Args:
        rows (np.ndarray): ``(M, C)`` bank rows.
        fraction (float): share of rows to keep, in ``(0, 1]``; ``1`` keeps every row.
        cosine (bool): measure distances between unit-normalised rows. Defaults to ``False``.

    Returns:
        np.ndarray: sorted int64 indices of the kept rows.

    Example:
        >>> rows = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]])
        >>> coreset_indices(rows, 0.5).tolist()
        [0, 3]
    """
    check_coreset_fraction(fraction)
    rows = np.asarray(rows, dtype=np.float32)
    count = rows.shape[0]
    size = min(count, max(1, int(np.ceil(fraction * count - 1e-9))))
    if size >= count:
        return np.arange(count, dtype=np.int64)
    if cosine:
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    squared = np.einsum("ij,ij->i", rows, rows)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = 0
    nearest = squared - 2 * rows @ rows[0] + squared[0]  # squared distance of every row to the kept ones
    nearest[0] = -np.inf  # kept rows are never picked again (rounding can leave them slightly above 0)
    for step in range(1, size):
        index = int(np.argmax(nearest))
        chosen[step] = index
        nearest = np.minimum(nearest, squared - 2 * rows @ rows[index] + squared[index])
        nearest[index] = -np.inf
    return np.sort(chosen)

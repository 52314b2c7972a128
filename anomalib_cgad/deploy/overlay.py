"""Heat-map overlays of anomaly maps, with numpy and Pillow only (``predict-ov --out`` runs without torch).

anomalib's own ``visualize_anomaly_map`` / ``overlay_image`` take torch tensors and import torch; the
deployment path must not, so it colours maps here: the "jet" colour ramp (blue = normal, red = anomalous, the
look of anomalib's and OpenCV's heat maps) blended half-and-half over the image.

Example:
    >>> import numpy as np
    >>> overlay_heatmap(np.zeros((3, 4, 4), np.float32), np.ones((1, 4, 4), np.float32)).getpixel((0, 0))
    (64, 0, 0)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["jet", "overlay_heatmap"]


def jet(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` values in [0, 1] (clipped) → ``(H, W, 3)`` uint8 colours of the jet ramp.

    Piecewise linear: dark blue at 0, blue, cyan, yellow, red, dark red at 1.

    Example:
        >>> jet(np.array([[0.0, 0.5, 1.0]])).tolist()
        [[[0, 0, 128], [128, 255, 128], [128, 0, 0]]]
    """
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return np.round(np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay_heatmap(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The jet-coloured ``anomaly_map`` (values in [0, 1]) blended over ``image`` (``(3, H, W)`` in [0, 1]).

    Args:
        image (np.ndarray): ``(3, H, W)`` float image in [0, 1], as the inferencer reads it.
        anomaly_map (np.ndarray): ``(H, W)`` or ``(1, H, W)`` normalised map (0.5 = the threshold).
        alpha (float): weight of the heat map. Defaults to ``0.5``.

    Returns:
        Image.Image: an RGB image of the map's size.
    """
    base = Image.fromarray(np.round(np.clip(np.asarray(image).transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8))
    heat = Image.fromarray(jet(np.asarray(anomaly_map).squeeze()))
    if heat.size != base.size:
        base = base.resize(heat.size, Image.BILINEAR)
    return Image.blend(base.convert("RGB"), heat, alpha)

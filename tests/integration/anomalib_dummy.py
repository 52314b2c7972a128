"""anomalib's dummy MVTec AD data, generated the way anomalib's own test suite generates it.

anomalib's ``tests/helpers/data.py`` (``DummyImageDatasetGenerator(data_format="mvtecad")``) is not shipped in the
wheel, so this writes the same dataset with anomalib's own ``PerlinAnomalyGenerator``: category ``dummy``,
``train/good`` and ``test/good`` hold uniformly coloured images (one random colour each), ``test/bad`` the same kind
of image with a Perlin-noise perturbation blended in (beta 0.2) and ``ground_truth/bad/<i>_mask.png`` its mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from PIL import Image


def make_dummy_mvtecad(
    root: Path, num_train: int = 5, num_test: int = 5, image_shape: tuple[int, int] = (64, 64), seed: int = 0
) -> Path:
    """Write ``<root>/mvtecad/dummy`` (anomalib's dummy MVTec AD layout); return ``<root>/mvtecad``."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # the Perlin generator draws from torch
    perlin = PerlinAnomalyGenerator()
    category = Path(root) / "mvtecad" / "dummy"

    def normal() -> np.ndarray:
        image = np.zeros((*image_shape, 3), dtype=np.uint8)
        image[...] = rng.integers(low=0, high=255, size=3)
        return image

    def save(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for split, count in (("train", num_train), ("test", num_test)):
        for i in range(count):
            save(category / split / "good" / f"{i:03}.png", normal())
    for i in range(num_test):
        image = normal()
        perturbation, mask = perlin.generate_perturbation(height=image_shape[0], width=image_shape[1])
        perturbation, mask = perturbation.cpu().numpy(), mask.cpu().numpy()
        abnormal = image * (1 - mask) + 0.2 * perturbation + 0.8 * image * mask
        save(category / "test" / "bad" / f"{i:03}.png", abnormal.astype(np.uint8))
        save(category / "ground_truth" / "bad" / f"{i:03}_mask.png", (mask.squeeze() * 255).astype(np.uint8))
    return category.parent

"""The anomaly map's matrix form equals up-sampling + anomalib's GaussianBlur2d."""

from __future__ import annotations

import pytest
import torch

from anomalib_cgad.components.anomaly_map import AnomalyMapGenerator


@pytest.mark.parametrize(("size", "sigma"), [((64, 64), 4.0), ((160, 224), 4.0), ((96, 80), 2.0)])
def test_matrix_form_equals_upsample_then_gaussian_blur(size: tuple[int, int], sigma: float) -> None:
    torch.manual_seed(0)
    generator = AnomalyMapGenerator(sigma=sigma)
    scores = [torch.rand(2, 1, size[0] // 8, size[1] // 8), torch.rand(2, 1, size[0] // 16, size[1] // 16)]
    direct = generator.reference(scores, size)
    fast = generator(scores, size)
    assert fast.shape == (2, 1, *size)
    assert torch.allclose(fast, direct, atol=1e-5)


def test_a_single_hot_patch_spreads_symmetrically_and_keeps_its_mass() -> None:
    generator = AnomalyMapGenerator()
    scores = torch.zeros(1, 1, 8, 8)
    scores[..., 3:5, 3:5] = 1.0  # centred block: the map must be symmetric about the centre
    out = generator([scores], (64, 64))[0, 0]
    assert torch.allclose(out, out.flip(0), atol=1e-6)
    assert torch.allclose(out, out.flip(1), atol=1e-6)
    assert torch.isclose(
        out.sum(), torch.nn.functional.interpolate(scores, size=(64, 64), mode="bilinear").sum(), rtol=1e-4
    )

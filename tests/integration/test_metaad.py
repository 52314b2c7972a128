"""MetaAD: the outer level (off, and widening the margin), the ODIN step and the heads' patch scores."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import cpu_engine, small_model

from anomalib_cgad import MetaAD
from anomalib_cgad.models.metaad.torch_model import MetaADModel


def test_outer_level_off_really_skips_it(cross_class, tmp_path) -> None:
    model = small_model(MetaAD, episodes={"outer": False})
    cpu_engine(tmp_path, 1).fit(model=model, datamodule=cross_class())
    assert model.outer_steps == 0
    on = small_model(MetaAD)
    cpu_engine(tmp_path / "on", 1).fit(model=on, datamodule=cross_class())
    assert on.outer_steps > 0


def _anomaly_margin(model, datamodule) -> float:
    """Standardised margin of the anomaly map: (mean inside defects − mean outside) / std outside.

    On the source classes' validation images and the confidence scale ``1 − σ(z/T)`` (the quantity the outer
    loss widens); dividing by the spread of the normal pixels makes models with different logit scales and
    temperatures comparable (a raw mean difference rewards a model for merely stretching its scores).
    """
    datamodule.setup()
    inside, outside = [], []
    model.eval()
    model.model.score = "confidence"
    for batch in datamodule.val_dataloader():
        index = datamodule.class_index("validate", batch.image_path[0])
        model.set_references(datamodule.reference_images("validate", index))
        with torch.no_grad():
            out = model.model(model.pre_processor.transform(batch.image))
        mask = torch.nn.functional.interpolate(batch.gt_mask[:, None].float(), size=out.anomaly_map.shape[-2:])
        mask = mask[:, 0].bool()
        inside.append(out.anomaly_map[:, 0][mask])
        outside.append(out.anomaly_map[:, 0][~mask])
    outside = torch.cat(outside)
    return float((torch.cat(inside).mean() - outside.mean()) / outside.std())


@pytest.mark.parametrize("head", ["distance", "cosine"])
def test_outer_level_widens_the_margin_between_normal_and_anomalous(head, cross_class, tmp_path) -> None:
    margins = {}
    for outer in (False, True):
        torch.manual_seed(0)
        model = small_model(MetaAD, episodes={"outer": outer}, scoring={"head": head})
        cpu_engine(tmp_path / str(outer), 3).fit(model=model, datamodule=cross_class())
        margins[outer] = _anomaly_margin(model, cross_class())
    assert margins[True] > margins[False], margins


@pytest.mark.parametrize("head", ["distance", "cosine"])
def test_closed_form_odin_gradient_matches_autograd(head: str) -> None:
    torch.manual_seed(0)
    model = MetaADModel(backbone_weights=None, in_channels=16, head=head)
    model.latent_scale.fill_(0.7)
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    z = model.logits(x)
    (autograd,) = torch.autograd.grad(z.sum(), x)
    closed = model.logit_input_gradient(x.detach())
    assert torch.allclose(closed, autograd, atol=1e-6)


def test_distance_head_scores_a_zero_residual_as_most_normal() -> None:
    """Bias-free encoder: a patch equal to its reference (residual 0) gets the highest normality logit."""
    torch.manual_seed(0)
    model = MetaADModel(backbone_weights=None, in_channels=16)
    x = torch.randn(1, 16, 4, 4)
    x[..., 0, 0] = 0
    z = model.logits(x)
    assert z[0, 0, 0] == model.logit_scale * model.head
    assert (z.flatten()[1:] < z[0, 0, 0]).all()
    assert torch.allclose(
        model.logits(3 * x), model.logit_scale * (model.head - 3 * (model.head - z / model.logit_scale))
    )


@pytest.mark.parametrize("score", ["logit", "confidence"])
def test_metaad_patch_score_is_the_configured_function_of_the_odin_logit(score: str) -> None:
    torch.manual_seed(0)
    model = MetaADModel(backbone_weights=None, in_channels=16, score=score).eval()
    images = torch.rand(3, 3, 64, 64)
    model.set_reference(images[:1])
    with torch.no_grad():
        x = model.inputs(model.embed(images[1:]), model.bank_tensors()[0])
        z = model.logits(model.odin(x)) / model.temperature()
        patch = -z if score == "logit" else 1 - torch.sigmoid(z)
        expected = model.anomaly_map_generator([patch.unsqueeze(1)], (64, 64))
        out = model(images[1:])
    assert torch.allclose(out.anomaly_map, expected, atol=1e-6)
    assert torch.allclose(out.pred_score, expected.flatten(1).amax(1), atol=1e-6)
    with pytest.raises(ValueError, match="score must be one of"):
        MetaADModel(backbone_weights=None, score="probability")
    with pytest.raises(ValueError, match="head must be one of"):
        MetaADModel(backbone_weights=None, head="mlp")

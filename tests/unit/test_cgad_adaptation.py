"""CGAD's class adaptation on the torch model: what ``reference_scale`` removes and what it keeps."""

from __future__ import annotations

import pytest
import torch

from anomalib_cgad.components.reference_bank import BankOptions
from anomalib_cgad.models.cgad.torch_model import CGADModel, leave_one_out_residuals, reference_channel_scales

pytestmark = pytest.mark.filterwarnings("ignore")


def _scores(model: CGADModel, refs: list[torch.Tensor], queries: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        bank = model.bank_from_features(refs, (64, 64))
        return model.score_features(queries, bank, (64, 64)).pred_score


@pytest.mark.parametrize("matching", ["cosine", "l2"])
def test_reference_scale_removes_a_class_wide_feature_scale(matching: str) -> None:
    """A class whose features are all ``c`` times larger (a brighter product, a stronger texture) gets the
    same scores with ``reference_scale`` and ``level_scale``: its references' residuals grow by the same
    factor. Without adaptation the scores move."""
    torch.manual_seed(0)
    refs = [torch.rand(3, 40, 8, 8), torch.rand(3, 112, 4, 4)]
    queries = [torch.rand(2, 40, 8, 8), torch.rand(2, 112, 4, 4)]
    scaled = lambda levels: [3.0 * level for level in levels]  # noqa: E731
    results = {}
    for adaptation in ("none", "reference_scale", "level_scale"):
        torch.manual_seed(1)
        model = CGADModel(backbone_weights=None, bank=BankOptions(matching=matching), adaptation=adaptation).eval()
        results[adaptation] = (_scores(model, refs, queries), _scores(model, scaled(refs), scaled(queries)))
    plain, plain_scaled = results["none"]
    for adaptation in ("reference_scale", "level_scale"):
        adapted, adapted_scaled = results[adaptation]
        assert torch.allclose(adapted, adapted_scaled, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, plain_scaled, rtol=1e-2)


def test_reference_channel_scales_are_the_mean_leave_one_out_residual_per_channel() -> None:
    torch.manual_seed(0)
    features = [torch.rand(4, 6, 5, 5)]
    loo = leave_one_out_residuals(features, "l2", "sq_diff")
    (scale,) = reference_channel_scales(loo)
    assert scale.shape == (6,)
    assert torch.allclose(scale, loo[0].mean(dim=(0, 2, 3)))
    (pooled,) = reference_channel_scales(loo, pooled=True)
    assert torch.allclose(pooled, torch.full((6,), float(loo[0].mean())))
    with pytest.raises(ValueError, match="adaptation must be one of"):
        CGADModel(backbone_weights=None, adaptation="film")


def test_a_bank_from_before_class_adaptation_counts_as_none() -> None:
    """A CGAD bank written before banks carried ``adaptation`` has no channel scales: a model without
    adaptation takes it, a model with one refuses it in one line (else its scales would silently stay 1)."""
    import numpy as np

    from anomalib_cgad.deploy.inferencer import Bank
    from anomalib_cgad.errors import BankError

    old = Bank([np.zeros((4, 2), np.float32)], {"model": "CGAD"})
    old.check({"model": "CGAD", "adaptation": "none"})
    Bank([np.zeros((4, 2), np.float32)], {"model": "ResAD"}).check({"model": "ResAD"})  # no key, not asked
    with pytest.raises(BankError, match="adaptation: bank has 'none', model has 'meta_scale'"):
        old.check({"model": "CGAD", "adaptation": "meta_scale"})
    # today's default model refuses it too, in one line that says what to do (its latent centres would be 0)
    with pytest.raises(BankError, match=r"adaptation: bank has 'none', model has 'latent_centre'\)\. Recompute it"):
        old.check({"model": "CGAD", "adaptation": "latent_centre"})


def test_latent_centre_moves_the_flows_base_to_the_references_and_is_part_of_the_bank() -> None:
    """``latent_centre``: the bank holds the mean flow output of the references' leave-one-out residuals per
    level; scoring subtracts it before the Gaussian likelihood. With centres of 0 it is the plain model; a
    class whose references sit elsewhere in the latent space gets other scores from the same residuals."""
    torch.manual_seed(0)
    refs = [torch.rand(3, 40, 8, 8), torch.rand(3, 112, 4, 4)]
    queries = [torch.rand(2, 40, 8, 8), torch.rand(2, 112, 4, 4)]
    plain = CGADModel(backbone_weights=None).eval()
    centred = CGADModel(backbone_weights=None, adaptation="latent_centre").eval()
    missing, unexpected = centred.load_state_dict(plain.state_dict(), strict=False)  # the same weights
    assert sorted(missing) == ["latent_mean_0", "latent_mean_1"] and not unexpected
    with torch.no_grad():
        bank = centred.bank_from_features(refs, (64, 64))
        levels, centres, _ = centred.split_bank(bank)
        loo = leave_one_out_residuals(refs, centred.bank.matching, centred.bank.residual)
        for level, (centre, feature) in enumerate(zip(centres, centred.constraintor(loo), strict=True)):
            assert centre.shape == (feature.shape[1],)
            assert torch.allclose(centre, centred.flow.latents(level, feature)[0].mean(0))
        zero = [*levels, *[torch.zeros_like(c) for c in centres], bank[-1]]
        same = centred.score_features(queries, zero, (64, 64)).pred_score
        assert torch.allclose(same, _scores(plain, refs, queries), atol=1e-5)
        assert not torch.allclose(centred.score_features(queries, bank, (64, 64)).pred_score, same, atol=1e-3)
        centred.set_bank_tensors(bank, num_refs=3)  # stored as bank state, named for what it is
    assert all(centred.is_bank_state(f"latent_mean_{level}") for level in range(2))
    assert torch.equal(centred.latent_mean_1, centres[1])
    assert centred.bank_metadata()["adaptation"] == "latent_centre"

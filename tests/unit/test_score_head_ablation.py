"""The score-head ablation's re-scoring: its latent path is the model's likelihood, its heads use the references."""

from __future__ import annotations

import doctest

import pytest
import torch

import benchmarks.score_head_ablation as ablation
from anomalib_cgad.models.cgad.torch_model import CGADModel

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model_and_levels():
    torch.manual_seed(0)
    model = CGADModel(backbone_weights=None).eval()
    refs = [torch.rand(3, 40, 8, 8), torch.rand(3, 112, 4, 4)]
    queries = [torch.rand(2, 40, 8, 8), torch.rand(2, 112, 4, 4)]
    with torch.no_grad():
        bank = model.bank_from_features(refs, (64, 64))
        levels = model.levels_from_residuals(model.test_residuals(queries, model.split_bank(bank)[0]))
    return model, refs, queries, bank, levels


def test_latents_give_back_the_models_own_likelihood(model_and_levels) -> None:
    """The unfolded flow pass the latent heads read reproduces the folded eval-mode ``logp̄`` the model scores."""
    model, _, _, _, levels = model_and_levels
    with torch.no_grad():
        for logp, (z, log_jac_det) in zip(levels.logps, ablation.latents(model, levels.constrained), strict=True):
            assert torch.allclose(ablation.gaussian_logp(z, log_jac_det).reshape(logp.shape), logp, atol=1e-4)


def test_heads_depend_on_the_references_and_shipped_is_the_models_score(model_and_levels) -> None:
    model, refs, queries, bank, _ = model_and_levels
    with torch.no_grad():
        statistics = ablation.reference_head_statistics(model, refs)
        scores = ablation.image_scores(model, queries, bank, statistics, (64, 64))
        shipped = model.score_features(queries, bank, (64, 64)).pred_score.numpy()
        other = ablation.reference_head_statistics(model, [2.0 * level for level in refs])
        moved = ablation.image_scores(model, queries, bank, other, (64, 64))
    assert set(scores) == {"shipped", "level_0", "level_1", *ablation.HEADS[1:]}
    assert (scores["shipped"] == shipped).all()
    for head in ablation.HEADS[1:]:  # the reference-set heads move with the reference statistics
        assert not (scores[head] == moved[head]).all(), head
    assert (scores["level_0"] == moved["level_0"]).all()  # a single level's likelihood does not


def test_docstring_examples_run() -> None:
    result = doctest.testmod(ablation)
    assert result.attempted >= 2 and result.failed == 0

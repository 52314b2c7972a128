"""Shared components: reference bank residuals, flow, episodes, confidence margin, PCGrad."""

from __future__ import annotations

import pytest
import torch

from anomalib_cgad.components.confidence_margin import (
    BoundedTemperature,
    confidence_margin_loss,
    outer_backward,
    pcgrad_backward,
)
from anomalib_cgad.components.episodes import EpisodeSampler
from anomalib_cgad.components.flow import ConditionalFlow, chunks
from anomalib_cgad.components.reference_bank import BankMismatchError, ReferenceBank, residual_features


@pytest.mark.parametrize("matching", ["l2", "cosine"])
@pytest.mark.parametrize("residual", ["diff", "sq_diff"])
def test_reference_against_a_bank_containing_itself_is_zero(matching: str, residual: str) -> None:
    torch.manual_seed(0)
    refs = [torch.randn(3, 16, 8, 8), torch.randn(3, 32, 4, 4)]
    bank = ReferenceBank(2, matching=matching, residual=residual)
    bank.set(refs)
    for level in bank.residuals([r[1:2] for r in refs]):
        assert level.abs().max() < 1e-4
    other = bank.residuals([torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)])
    assert all(level.abs().mean() > 0.1 for level in other)


def test_nearest_neighbour_matches_brute_force() -> None:
    torch.manual_seed(1)
    queries, bank = torch.randn(1, 8, 5, 5), torch.randn(40, 8)
    residual = residual_features([queries], [bank])[0]
    rows = queries.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = rows - bank[torch.cdist(rows, bank).argmin(1)]
    assert torch.allclose(residual.permute(0, 2, 3, 1).reshape(-1, 8), expected, atol=1e-5)


def test_bank_refuses_non_finite_references() -> None:
    bank = ReferenceBank(1)
    with pytest.raises(BankMismatchError, match="NaN or inf"):
        bank.set([torch.full((1, 4, 3, 3), float("nan"))])
    assert not bank.is_set


def test_flow_log_likelihood_is_finite_and_learns_normal_patches() -> None:
    torch.manual_seed(0)
    flow = ConditionalFlow([6], coupling_blocks=2, condition_dim=8)
    normal = 0.3 * torch.randn(16, 6, 6, 6)
    optimizer = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for _ in range(60):
        logp, _ = flow(0, normal)
        loss = -logp.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logp_normal, _ = flow(0, 0.3 * torch.randn(4, 6, 6, 6))
        logp_defect, _ = flow(0, 0.3 * torch.randn(4, 6, 6, 6) + 2.0)
    assert torch.isfinite(logp_normal).all()
    assert logp_normal.mean() > logp_defect.mean() + 1.0


def test_chunks_cover_every_row_including_the_remainder() -> None:
    parts = list(chunks(10_001, 4096))
    assert [len(p) for p in parts] == [4096, 4096, 1809]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(10_001))


def test_episodes_rotate_roles_in_both_directions() -> None:
    sampler = EpisodeSampler(["a", "b", "c", "d"], n_hard=1, n_random=0, seed=0)
    pairs = set()
    for _ in range(12):
        episode = sampler.sample()
        assert not set(episode.inner) & set(episode.outer)
        assert episode.k in (1, 2, 4, 8)
        pairs |= {(i, o) for i in episode.inner for o in episode.outer}
    assert len(pairs) == 12  # all ordered pairs of 4 classes after one cycle


def test_single_direction_keeps_a_fixed_split_and_hardness_ranks() -> None:
    sampler = EpisodeSampler(["a", "b", "c", "d"], direction="single", n_hard=1, n_random=0, seed=3)
    inner = {c for _ in range(20) for c in sampler.sample().inner}
    assert inner == set(sampler.id_pool)
    hard = EpisodeSampler(["a", "b", "c"], n_hard=2, n_random=0, seed=0)
    episode = hard.sample({"a": 0.1, "b": 0.9, "c": 0.5})
    assert set(episode.outer) - set(episode.inner) <= {"a", "b", "c"}
    assert "b" in episode.outer or "b" in episode.inner


def test_same_seed_same_episodes() -> None:
    def run(seed: int) -> list:
        sampler = EpisodeSampler(["a", "b", "c"], seed=seed)
        return [sampler.sample() for _ in range(6)]

    assert run(5) == run(5)


def test_confidence_margin_rewards_separation_and_temperature_is_bounded() -> None:
    temperature = BoundedTemperature(1.0, (0.5, 10.0))
    separated = confidence_margin_loss(torch.full((8,), 4.0), torch.full((8,), -4.0), temperature())
    mixed = confidence_margin_loss(torch.full((8,), 0.1), torch.full((8,), 0.0), temperature())
    assert separated < mixed
    for margin in ("pairwise", "energy"):
        assert torch.isfinite(confidence_margin_loss(torch.randn(5), torch.randn(7), temperature(), margin=margin))
    with torch.no_grad():
        temperature.rho.fill_(100.0)
    assert 0.5 <= float(temperature()) <= 10.0


def test_pcgrad_removes_conflicting_components() -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    loss_a = (weight * torch.tensor([1.0, 0.0])).sum()
    loss_b = (weight * torch.tensor([-1.0, 1.0])).sum()
    conflicts = pcgrad_backward([loss_a, loss_b], [weight])
    assert conflicts == 2
    # each gradient lost its component along the other; the sum no longer opposes either direction
    assert torch.dot(weight.grad, torch.tensor([1.0, 0.0])) >= -1e-6
    assert torch.dot(weight.grad, torch.tensor([-1.0, 1.0])) >= -1e-6


@pytest.mark.parametrize("learn_temperature", [True, False])
def test_outer_backward_gives_calibration_only_the_margin_gradient(learn_temperature: bool) -> None:
    """PCGrad on the shared parameters; boundaries and T get d(Σ margins) only; a fixed T is skipped, not an error."""
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4))
    boundary = torch.nn.Parameter(torch.zeros(2))
    temperature = BoundedTemperature(1.0, learn=learn_temperature)
    z = (shared[:2] - boundary) / temperature()
    losses = [confidence_margin_loss(z[:1], z[1:], temperature()), (shared[2:] ** 2).sum() + boundary.sum()]
    clean = -(shared**2).sum()
    margin_grads = torch.autograd.grad(sum(losses), [boundary], retain_graph=True)[0]
    outer_backward(clean, losses, [shared], [boundary, temperature.rho], pcgrad=True, backward=None, seed=0)
    assert torch.allclose(boundary.grad, margin_grads)
    assert shared.grad is not None and torch.isfinite(shared.grad).all()
    assert (temperature.rho.grad is not None) == learn_temperature
    called = []
    outer_backward(clean.detach(), [torch.tensor(1.0)], [shared], [boundary], pcgrad=False, backward=called.append)
    assert len(called) == 1 and float(called[0]) == float(clean) + 1.0

"""Conditional flow: exact log-likelihood, the abnormal-density identity, learning on residuals, chunk coverage."""

from __future__ import annotations

import math

import pytest
import torch
from anomalib.engine import Engine

from anomalib_cgad import ResAD
from anomalib_cgad.components.backbone import FeatureExtractor
from anomalib_cgad.components.flow import ConditionalFlow, FlowOptions
from anomalib_cgad.components.reference_bank import flatten_patches, residual_features
from anomalib_cgad.models.base import load_images
from anomalib_cgad.models.resad.lightning_model import ResADTraining

IMAGENET = (torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None])


def test_logp_is_the_exact_per_dimension_log_likelihood() -> None:
    """logp̄ = (log N(z; 0, I) + log|det ∂z/∂x|) / C, with the log-det checked against autograd's Jacobian."""
    torch.manual_seed(0)
    flow = ConditionalFlow([6], coupling_blocks=3, condition_dim=8).double()
    for parameter in (p for p in flow.parameters() if p.requires_grad):  # move off the near-identity init
        parameter.data += 0.05 * torch.randn_like(parameter)
    rows = torch.randn(5, 6, dtype=torch.float64)
    condition = flow.position_code(1, 1, 5, rows)[:5]
    logp, zmean = flow.rows(0, rows, condition)
    for i in range(5):

        def transform(x: torch.Tensor, i: int = i) -> torch.Tensor:
            return flow.flows[0](x[None], [condition[i : i + 1]])[0][0]

        z = transform(rows[i])
        jacobian = torch.autograd.functional.jacobian(transform, rows[i])
        expected = (-3 * math.log(2 * math.pi) - 0.5 * (z**2).sum() + torch.linalg.slogdet(jacobian)[1]) / 6
        assert torch.allclose(logp[i], expected, atol=1e-8)
        assert torch.allclose(zmean[i], z.mean(), atol=1e-12)


def test_grid_path_equals_plain_rows_and_tracks_weight_changes() -> None:
    """``forward`` on a grid (position share of the subnet computed once per position; in eval mode the folded
    blocks, both cached) gives the values of the plain row path, with the same parameters and checkpoint keys as
    CFlow's ``cflow_head``."""
    import numpy as np
    from anomalib.models.image.cflow.utils import cflow_head

    torch.manual_seed(0), np.random.seed(0)
    flow = ConditionalFlow([6, 10], coupling_blocks=3, condition_dim=8).double()
    torch.manual_seed(0), np.random.seed(0)
    reference = torch.nn.ModuleList(cflow_head(8, 3, 1.9, c, permute_soft=True) for c in (6, 10)).double()
    assert list(flow.flows.state_dict()) == list(reference.state_dict())
    pairs = zip(flow.flows.state_dict().values(), reference.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    for parameter in (p for p in flow.parameters() if p.requires_grad):  # move off the near-identity init
        parameter.data += 0.05 * torch.randn_like(parameter)

    feature = torch.randn(3, 10, 4, 5, dtype=torch.float64)
    rows, condition = flatten_patches(feature), flow.position_code(3, 4, 5, feature)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return flow(1, feature)[0].flatten(), flow.rows(1, rows, condition)[0]

    for mode in (flow.train, flow.eval):
        mode()
        grid, plain = both()
        assert torch.allclose(grid, plain, atol=1e-10)
    with torch.no_grad():  # one grid: the position share enters the first product directly
        single = flow(1, feature[:1])[0].flatten()
        assert torch.allclose(single, flow.rows(1, rows[:20], condition[:20])[0], atol=1e-10)
    subnet = flow.flows[1].module_list[0].subnet
    assert 1 in flow._folded  # eval + no_grad: the folded blocks and their position shares are kept
    block = flow.flows[1].module_list[2]
    for change in (subnet[0].weight, block.global_scale, block.global_offset, block.subnet[2].bias):
        with torch.no_grad():
            change.add_(0.5)  # an in-place change (optimiser step, load_state_dict) must not reuse a cache
        grid, plain = both()
        assert torch.allclose(grid, plain, atol=1e-10)
    flow.train()
    grid_with_grad = flow(1, feature)[0]
    grid_with_grad.sum().backward()
    assert subnet[0].weight.grad[:, -8:].abs().sum() > 0  # the condition columns are trained through the grid path


def test_abnormal_density_softmax_is_sigmoid_of_mean_z() -> None:
    """softmax([logp̄, logp̄_a])₁ with the N(𝟙, I) abnormal density equals σ(mean_c z − ½)."""
    torch.manual_seed(0)
    channels = 10
    z, log_det = 2 * torch.randn(100, channels), torch.randn(100)
    logp = (-channels / 2 * math.log(2 * math.pi) - 0.5 * (z**2).sum(1) + log_det) / channels
    logp_a = (-channels / 2 * math.log(2 * math.pi) - 0.5 * ((z - 1) ** 2).sum(1) + log_det) / channels
    softmax = torch.softmax(torch.stack([logp, logp_a], 1), 1)[:, 1]
    assert torch.allclose(logp_a, logp + z.mean(1) - 0.5, atol=1e-5)
    assert torch.allclose(softmax, torch.sigmoid(z.mean(1) - 0.5), atol=1e-6)


def _normalised(paths: list) -> torch.Tensor:
    return (load_images(paths, (96, 96)) - IMAGENET[0]) / IMAGENET[1]


def test_flow_on_residuals_scores_pasted_defects_of_an_unseen_class_lower(synthetic_root) -> None:
    """A flow fit on normal residuals of three classes gives finite, lower logp̄ to defect patches of a fourth."""
    torch.manual_seed(0)
    extractor = FeatureExtractor(layers=(2,))
    rows = []
    for category in ("stripes", "dots", "checker"):
        paths = sorted((synthetic_root / category / "train" / "good").glob("*.png"))
        features = extractor(_normalised(paths))[0]
        bank = flatten_patches(features[:4])
        rows.append(residual_features([features[4:]], [bank])[0])
    train = torch.cat(rows)
    flow = ConditionalFlow([train.shape[1]], coupling_blocks=2, condition_dim=16)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(40):
        logp, _ = flow(0, train)
        optimizer.zero_grad()
        (-logp.mean()).backward()
        optimizer.step()

    target = synthetic_root / "waves"
    refs = extractor(_normalised(sorted((target / "train" / "good").glob("*.png"))[:4]))[0]
    defect_dirs = [d for d in (target / "test").iterdir() if d.name != "good"]
    images = sorted(p for d in defect_dirs for p in d.glob("*.png"))
    masks = torch.cat([
        load_images([target / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"], (96, 96))[:, :1] for p in images
    ])  # fmt: skip
    features = extractor(_normalised(images))[0]
    with torch.no_grad():
        logp, _ = flow(0, residual_features([features], [flatten_patches(refs)])[0])
    coverage = torch.nn.functional.adaptive_avg_pool2d(masks, logp.shape[-2:])[:, 0]
    assert torch.isfinite(logp).all()
    defect, clean = logp[coverage > 0.5], logp[coverage == 0]
    assert len(defect) > 10
    assert defect.mean() < clean.mean() - 1.0, (float(defect.mean()), float(clean.mean()))


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_training_step_trains_every_level_on_every_row(preset: str, cross_class, tmp_path, monkeypatch) -> None:
    """Chunked flow updates cover all rows of every level, remainders included (the released code drops them)."""
    model = ResAD(
        preset=preset, visualizer=False, training=ResADTraining(fiber_batch=1000), flow=FlowOptions(2), layers=(2, 3)
    )
    model.pre_processor = ResAD.configure_pre_processor((96, 96))
    seen: dict[int, list[int]] = {0: [], 1: []}
    original = model.model.flow.rows

    def spy(level: int, rows: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen[level].append(len(rows))
        assert model.model.constraintor.training  # BN learns its statistics on the training classes
        assert not any(m.training for m in model.model.backbone.modules() if m is not model.model.backbone)
        return original(level, rows, condition)

    before = [[p.detach().clone() for p in flow.parameters()] for flow in model.model.flow.flows]
    monkeypatch.setattr(model.model.flow, "rows", spy)
    engine = Engine(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path, accelerator="cpu",
        devices=1, logger=False, enable_progress_bar=False,
    )  # fmt: skip
    engine.fit(model=model, datamodule=cross_class(train_batch_size=5))
    images = 5 + model.anomalies_per_batch
    for level, side in enumerate((12, 6)):  # 96 px at strides 8 and 16
        total = images * side * side
        assert sum(seen[level]) == total, (level, seen[level], total)
        assert seen[level][:-1] == [1000] * (total // 1000)
        after = list(model.model.flow.flows[level].parameters())
        pairs = [(a, b) for a, b in zip(before[level], after, strict=True) if b.requires_grad]
        assert all(not torch.equal(a, b) for a, b in pairs), level

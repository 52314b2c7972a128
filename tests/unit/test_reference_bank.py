"""Reference bank: nearest-neighbour residuals on real backbone features, matching modes, storage, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from anomalib_cgad.components.backbone import FeatureExtractor
from anomalib_cgad.components.reference_bank import (
    BankMismatchError,
    ReferenceBank,
    best_index,
    flatten_patches,
    nearest_reference,
    residual_features,
)
from anomalib_cgad.coreset import coreset_indices
from anomalib_cgad.deploy.inferencer import Bank
from anomalib_cgad.models.base import load_images

IMAGENET = (torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None])


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(layers=(2, 3))


def _images(root, category: str, split: str = "train", kind: str = "good", count: int = 4) -> torch.Tensor:
    paths = sorted((root / category / split / kind).glob("*.png"))[:count]
    return (load_images(paths, (96, 96)) - IMAGENET[0]) / IMAGENET[1]


@pytest.mark.parametrize("matching", ["l2", "cosine"])
@pytest.mark.parametrize("residual", ["diff", "sq_diff"])
def test_real_image_against_a_bank_containing_it_has_zero_residual(
    extractor, synthetic_root, matching: str, residual: str
) -> None:
    features = extractor(_images(synthetic_root, "stripes"))
    bank = ReferenceBank(2, matching=matching, residual=residual)
    bank.set(features)
    own = bank.residuals([f[2:3] for f in features])
    scale = [f.abs().mean() for f in features]
    for level, value in enumerate(own):
        # The ‖x‖²−2xy+‖y‖² form loses a little precision, but the nearest row must be the patch itself.
        assert value.abs().max() < 1e-4 * max(1.0, float(scale[level])), (level, float(value.abs().max()))
    other = bank.residuals(extractor(_images(synthetic_root, "stripes", "test", count=1)))
    assert all(value.abs().mean() > 1e-3 for value in other)


def test_cosine_matching_picks_the_most_similar_direction_not_the_closest_point() -> None:
    bank = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.1]])
    assert torch.equal(nearest_reference(query, bank, "l2"), bank[1:2])
    assert torch.equal(nearest_reference(query, bank, "cosine"), bank[0:1])
    torch.manual_seed(0)
    queries, rows = torch.randn(50, 8), torch.randn(30, 8)
    brute = rows[torch.nn.functional.cosine_similarity(queries[:, None], rows[None], dim=-1).argmax(1)]
    assert torch.equal(nearest_reference(queries, rows, "cosine"), brute)


def _separation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Scale-free class separation of patch rows: distance of the means over the pooled spread."""
    return float((a.mean(0) - b.mean(0)).norm() / ((a.var(0) + b.var(0)) / 2).sum().sqrt())


@pytest.mark.parametrize(("matching", "residual"), [("l2", "diff"), ("cosine", "sq_diff")])
def test_normal_residuals_of_different_classes_are_closer_than_raw_features(
    extractor, synthetic_root, matching: str, residual: str
) -> None:
    """ResAD's premise for both presets: the class shift is far smaller in residual space than in feature space."""
    rows = {}
    for category in ("stripes", "dots", "checker"):
        refs = extractor(_images(synthetic_root, category, "train", count=4))
        queries = extractor(_images(synthetic_root, category, "test", count=4))
        residuals = residual_features(queries, [flatten_patches(r) for r in refs], matching, residual)
        rows[category] = [(flatten_patches(q), flatten_patches(r)) for q, r in zip(queries, residuals, strict=True)]
    for level in range(2):
        for a, b in (("stripes", "dots"), ("dots", "checker"), ("stripes", "checker")):
            raw = _separation(rows[a][level][0], rows[b][level][0])
            res = _separation(rows[a][level][1], rows[b][level][1])
            assert raw > 1.0, (level, a, b, raw)  # the generated classes really differ
            assert res < 0.6 * raw, (level, a, b, raw, res)


@pytest.mark.parametrize(("matching", "residual"), [("l2", "diff"), ("cosine", "sq_diff")])
def test_per_sample_references_match_one_bank_per_sample(matching: str, residual: str) -> None:
    """Training queries of a batch, each against its own reference set, equal separate single-bank calls."""
    torch.manual_seed(0)
    features = [torch.randn(3, 8, 4, 4), torch.randn(3, 16, 2, 2)]
    refs = [torch.randn(3, 2, 8, 4, 4), torch.randn(3, 2, 16, 2, 2)]  # (B, k, C, H, W)
    banks = [torch.stack([flatten_patches(r[b]) for b in range(3)]) for r in refs]  # (B, k·H·W, C)
    batched = residual_features(features, banks, matching, residual)
    for b in range(3):
        single = residual_features([f[b : b + 1] for f in features], [bank[b] for bank in banks], matching, residual)
        for level in range(2):
            assert torch.allclose(batched[level][b : b + 1], single[level], atol=1e-5)


def test_bank_buffers_restore_any_size() -> None:
    small, large = ReferenceBank(2), ReferenceBank(2)
    small.set([torch.rand(2, 4, 3, 3), torch.rand(2, 8, 2, 2)])
    large.set([torch.rand(5, 4, 3, 3), torch.rand(5, 8, 2, 2)])
    fresh = ReferenceBank(2)
    fresh.load_state_dict(large.state_dict())
    assert [t.shape for t in fresh.tensors()] == [torch.Size([45, 4]), torch.Size([20, 8])]
    fresh.load_state_dict(small.state_dict())
    assert [t.shape for t in fresh.tensors()] == [torch.Size([18, 4]), torch.Size([8, 8])]
    assert int(fresh.num_refs) == 2


def test_bank_file_is_npz_arrays_with_json_metadata(tmp_path) -> None:
    """The one bank file: plain arrays + a JSON string (no pickle), checked against the model on use."""
    meta = {"model": "ResADModel", "backbone": "tf_efficientnet_lite0", "layers": [2, 3], "image_size": [96, 96]}
    bank = Bank([np.random.rand(18, 4).astype(np.float32), np.random.rand(8, 8).astype(np.float32)], meta)
    path = bank.save(tmp_path / "bank.npz")
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["__metadata__", "bank_0", "bank_1", "reference_stats"]
    loaded = Bank.load(path)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.tensors, bank.tensors, strict=True))
    loaded.check({**meta, "layers": (2, 3)})  # a tuple and a list of the same layers agree
    with pytest.raises(BankMismatchError, match=r"image_size: bank has \[96, 96\], model has \[256, 256\]"):
        loaded.check({"image_size": [256, 256]})
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        bank.save(path)


def test_old_torch_bank_file_is_refused_with_the_fix(tmp_path) -> None:
    """A ``.pt`` bank (``torch.save`` of tensors, the format before ``.npz``) is named as such, with the fix."""
    path = tmp_path / "bank.pt"
    torch.save({"format": "anomalib-cgad-bank/1", "metadata": {}, "levels": [torch.rand(4, 2)]}, path)
    with pytest.raises(BankMismatchError, match=r"torch \(\.pt\) bank file.*save_bank\('NEW\.npz'\)"):
        Bank.load(path)


class _Residuals(nn.Module):
    def __init__(self, matching: str, residual: str) -> None:
        super().__init__()
        self.matching, self.residual = matching, residual

    def forward(self, feature: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return residual_features([feature], [bank], self.matching, self.residual)[0]


@pytest.mark.parametrize(("matching", "residual"), [("l2", "diff"), ("cosine", "sq_diff")])
def test_residuals_export_with_the_bank_as_an_input_of_dynamic_size(matching: str, residual: str) -> None:
    """``torch.export`` accepts the matching (no cdist, no data-dependent branch); new bank sizes need no re-export."""
    torch.manual_seed(0)
    module = _Residuals(matching, residual)
    rows = torch.export.Dim("rows", min=2, max=100_000)
    exported = torch.export.export(
        module, (torch.randn(1, 8, 4, 4), torch.randn(64, 8)), dynamic_shapes=({}, {0: rows})
    ).module()
    for size in (10, 300):
        feature, bank = torch.randn(1, 8, 4, 4), torch.randn(size, 8)
        assert torch.allclose(exported(feature, bank), module(feature, bank), atol=1e-6)


@pytest.mark.parametrize("candidates", [40, 512, 1600, 1000])  # argmax; two-stage (one block, blocks, padded)
def test_every_form_of_best_index_is_argmax_ties_included(monkeypatch, candidates: int) -> None:
    """The two-stage search (eager, many candidates) and the ``ReduceMax``/``Where`` form used while exporting
    (OpenVINO's ``TopK`` was slow) return ``argmax``'s index, the first one on ties, for one bank and for one
    bank per sample."""
    torch.manual_seed(0)
    scores = torch.randn(3, 50, candidates).round(decimals=1)  # rounding makes many rows with tied maxima
    scores[0, 0] = 0.0  # a row that is all ties
    scores[0, 1, -1] = 9.0  # the maximum in the last (padded) block
    eager = best_index(scores)
    assert torch.equal(eager, scores.argmax(dim=-1))
    assert torch.equal(best_index(scores[1]), scores[1].argmax(dim=-1))
    assert eager[0, 0] == 0 and eager[0, 1] == candidates - 1
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    exported_form = best_index(scores)
    assert exported_form.dtype == eager.dtype
    assert torch.equal(exported_form, eager)
    # nearest_reference pads the bank while exporting (copies of row 0): same rows, any bank size
    queries, bank = torch.randn(2, 30, 8), torch.randn(2, candidates, 8)
    bank[:, -1] = queries[:, 0]  # row 0 of each sample matches the last bank row, whatever the padding
    monkeypatch.undo()
    expected = {m: nearest_reference(queries, bank, m) for m in ("l2", "cosine")}
    assert all(torch.equal(expected[m][:, 0], bank[:, -1]) for m in ("l2", "cosine"))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    for matching, rows in expected.items():
        assert torch.equal(nearest_reference(queries, bank, matching), rows)
        assert torch.equal(nearest_reference(queries[0], bank[0], matching), rows[0])


def _covering_radius(rows: torch.Tensor, kept: torch.Tensor) -> float:
    """Largest distance from a row to its nearest kept row."""
    return float(torch.cdist(rows, rows[kept]).min(dim=1).values.max())


def test_coreset_keeps_one_row_per_cluster_and_covers_better_than_a_random_subset() -> None:
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    rows = (centres[:, None] + 0.1 * torch.randn(4, 25, 2)).reshape(100, 2)
    kept = coreset_indices(rows.numpy(), 0.04)
    assert kept.tolist() == sorted(kept.tolist())
    assert sorted({int(i) // 25 for i in kept}) == [0, 1, 2, 3]  # 4 rows kept, one in every cluster
    features = torch.randn(400, 16)
    greedy = torch.from_numpy(coreset_indices(features.numpy(), 0.25))
    assert len(greedy) == 100 and len(set(greedy.tolist())) == 100
    random_radius = min(_covering_radius(features, torch.randperm(400)[:100]) for _ in range(5))
    assert _covering_radius(features, greedy) < random_radius
    assert torch.equal(greedy, torch.from_numpy(coreset_indices(features.numpy(), 0.25)))  # deterministic


def test_coreset_measures_cosine_distance_when_matching_is_cosine() -> None:
    # Rows 0-2 point one way (different lengths), row 3 another: with cosine distances rows 1 and 2 are
    # duplicates of row 0, so the second kept row must be row 3; with L2 it is the long row 2.
    rows = torch.tensor([[1.0, 0.0], [5.0, 0.0], [50.0, 0.0], [0.0, 1.0]]).numpy()
    assert coreset_indices(rows, 0.5, cosine=True).tolist() == [0, 3]
    assert coreset_indices(rows, 0.5, cosine=False).tolist() == [0, 2]
    assert coreset_indices(rows, 1.0).tolist() == [0, 1, 2, 3]
    assert coreset_indices(rows, 0.01).tolist() == [0]  # at least one row
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"bank coreset \(bank.coreset\) must lie in"):
            coreset_indices(rows, bad)
    with pytest.raises(ValueError, match=r"bank coreset \(bank.coreset\) must lie in"):
        ReferenceBank(1, coreset=0.0)


def test_coreset_bank_holds_reference_rows_and_references_still_have_zero_residual(extractor, synthetic_root) -> None:
    features = extractor(_images(synthetic_root, "stripes"))
    full = ReferenceBank(2, matching="l2", residual="sq_diff")  # residual sum = squared distance to the match
    half = ReferenceBank(2, matching="l2", residual="sq_diff", coreset=0.5)
    full.set(features)
    half.set(features)
    for rows, subset in zip(full.tensors(), half.tensors(), strict=True):
        assert subset.shape[0] == (rows.shape[0] + 1) // 2
        exact = torch.cdist(subset, rows, compute_mode="donot_use_mm_for_euclid_dist")
        assert exact.min(dim=1).values.max() == 0  # every kept row is a reference patch
    kept = flatten_patches(features[0])[coreset_indices(flatten_patches(features[0]).numpy(), 0.5)]
    assert torch.equal(half.tensors()[0], kept)
    query = extractor(_images(synthetic_root, "stripes", "test", count=1))
    exact, approximate = full.residuals(query), half.residuals(query)
    for a, b in zip(exact, approximate, strict=True):
        # fewer candidates: no residual gets smaller, and the mean grows only a little
        assert (b.sum(1) >= a.sum(1) * (1 - 1e-4)).all()
        assert a.mean() < b.mean() < 3 * a.mean()

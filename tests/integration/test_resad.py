"""ResAD: training references, losses, VQ + EFDM, bank handling, plain anomalib datamodules, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_cgad import ResAD
from anomalib_cgad.components.distribution_matching import ResidualCodebook, efdm
from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.components.reference_bank import BankMismatchError, flatten_patches
from anomalib_cgad.components.residual_loss import (
    BoundaryEMA,
    flow_loss_official,
    flow_loss_paper,
    focal,
    occ_log_barrier,
    occ_paper,
)
from anomalib_cgad.components.training_pool import ClassPool, TrainingPool
from anomalib_cgad.data import CrossClass, make_synthetic_mvtec
from anomalib_cgad.models.options import regroup_arguments

SIZE = (96, 96)


def _engine(tmp_path, epochs: int = 1, **kwargs) -> Engine:
    return Engine(
        max_epochs=epochs, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, **kwargs,
    )  # fmt: skip


def _resad(**kwargs) -> ResAD:
    """A small ResAD for CPU tests: 96 px input, two coupling blocks."""
    kwargs = {"visualizer": False, "flow": {"coupling_blocks": 2, "condition_dim": 32}, **kwargs}
    model = ResAD(**regroup_arguments(ResAD, kwargs))
    model.pre_processor = ResAD.configure_pre_processor(SIZE)
    return model


def _self_referenced_images(model: ResAD, datamodule) -> int:
    """Training images whose residual is zero everywhere (= their own image was among their references)."""
    count = 0
    for batch in datamodule.train_dataloader():
        residuals, _ = model._training_rows(batch)
        count += int((residuals[0].flatten(1).abs().amax(1) == 0).sum())
    return count


# ----------------------------------------------------------------------------------------------- references
def test_training_references_are_distinct_and_never_an_excluded_query() -> None:
    pool = TrainingPool(seed=0)
    pool.classes["a"] = ClassPool(normals=[torch.arange(10.0).reshape(10, 1, 1, 1)], paths=[str(i) for i in range(10)])
    for exclude in (torch.tensor([0, 1, 2]), [3, 4], range(5)):
        for _ in range(20):
            drawn = pool.draw_references("a", 4, exclude)[0].flatten().tolist()
            assert len(set(drawn)) == 4
            assert not set(drawn) & {float(i) for i in exclude}, (list(exclude), drawn)
    with pytest.raises(ValueError, match="'a' has 10 normal training images"):
        pool.draw_references("a", 8, list(range(5)))


def test_no_training_image_is_its_own_reference(cross_class, tmp_path) -> None:
    """The released code may use a query as its own reference (all-zero residual); we never do."""
    model, datamodule = _resad(), cross_class(train_batch_size=8)
    _engine(tmp_path, limit_train_batches=1, limit_val_batches=0).fit(model=model, datamodule=datamodule)
    assert _self_referenced_images(model, datamodule) == 0


def test_a_class_smaller_than_the_batch_trains_with_per_image_references(tmp_path) -> None:
    """When a batch holds the whole class, each image gets references other than itself instead of a crash."""
    root = make_synthetic_mvtec(
        tmp_path / "data", categories=("stripes", "dots", "waves"), n_train=3, n_test_good=2, n_test_bad=2,
        image_size=64, seed=1,
    )  # fmt: skip
    datamodule = CrossClass(
        source_dataset="MVTecAD", source_root=str(root), source_categories=["stripes", "dots"],
        target_categories=["waves"], k_shot=2, train_batch_size=16, eval_batch_size=8, num_workers=0,
    )  # fmt: skip
    model = _resad(training={"train_k_shot": 4, "synthetic_per_class": 2})
    _engine(tmp_path / "run", limit_val_batches=0).fit(model=model, datamodule=datamodule)
    assert model.trainer.global_step > 0
    assert _self_referenced_images(model, datamodule) == 0
    batch = next(iter(datamodule.train_dataloader()))
    residuals, coverage = model._training_rows(batch)
    assert residuals[0].shape[0] == coverage[0].shape[0] == 6 + model.anomalies_per_batch


def test_real_anomalies_are_used_when_the_class_has_them() -> None:
    """Synthetic (Perlin) anomalies only stand in for classes without labelled anomalies."""
    from types import SimpleNamespace

    model = _resad(backbone_weights=None, training={"anomalies_per_batch": 6})
    sizes = [(c, 32 // s) for c, s in zip(model.model.backbone.channels, model.model.backbone.strides, strict=True)]
    pool = TrainingPool(seed=0)
    for name, real in (("with_real", 2), ("synthetic_only", 0)):
        normals = [torch.randn(6, c, side, side) for c, side in sizes]
        anomalies = [torch.randn(5, c, side, side) for c, side in sizes]
        masks = [
            torch.cat([torch.ones(real, side, side), torch.full((5 - real, side, side), 0.75)]) for _, side in sizes
        ]
        pool.classes[name] = ClassPool(
            normals, [f"{name}/{i}" for i in range(6)], anomalies, masks, real_anomalies=real
        )
        pool.index.update({f"{name}/{i}": (name, i) for i in range(6)})
    model.training_pool = pool
    for name, value in (("with_real", 1.0), ("synthetic_only", 0.75)):
        _, coverage = model._training_rows(SimpleNamespace(image_path=[f"{name}/0", f"{name}/1"]))
        anomalous = coverage[0][2:]
        assert len(anomalous) == 6
        assert torch.all(anomalous == value), name


# ----------------------------------------------------------------------------------------------- losses
def test_paper_occ_pulls_normals_to_the_origin_and_keeps_anomalies_unchanged() -> None:
    torch.manual_seed(0)
    residual = torch.randn(6, 4).abs()
    coverage = torch.tensor([0, 0, 0, 1, 1, 1.0])
    ideal = torch.cat([torch.zeros(3, 4), residual[3:]])
    assert occ_paper(ideal, residual, coverage) == 0
    moved = ideal.clone().requires_grad_(True)
    loss = occ_paper(moved + torch.cat([torch.ones(3, 4), torch.zeros(3, 4)]), residual, coverage)
    loss.backward()
    expected = 3 * (math.sqrt(2 + 1) - 1) / 6  # ‖(1,1,1,1)‖₂ = 2 for three of the six rows
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert (moved.grad[:3] > 0).all()  # gradient descent moves normals back toward 0


def test_log_barrier_occ_is_zero_on_the_shell_and_positive_off_it() -> None:
    normal = torch.zeros(4, 9)
    norm = (1.3975**2) - 1  # A(x') = √(‖x'‖+1) − 1 = 0.3975 lies in [0.99·0.4, 0.4]
    normal[:, 0] = norm
    coverage = torch.zeros(4)
    assert occ_log_barrier(normal, normal, coverage) == 0
    assert occ_log_barrier(normal * 3, normal, coverage) > 0
    assert occ_log_barrier(normal / 3, normal, coverage) > 0
    far = torch.zeros(2, 9)
    far[:, 1] = 10.0  # anomalies left unchanged (x' = r) and far outside the shell
    rows, covs = torch.cat([normal, far]), torch.cat([coverage, torch.ones(2)])
    assert occ_log_barrier(rows, rows, covs) < 1e-6


def test_flow_losses_and_boundary() -> None:
    logp = torch.tensor([-1.0, -0.5, 0.0, 0.5, -3.0])
    coverage = torch.tensor([0, 0, 0, 0, 1.0])
    zmean = torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0])
    normal_only = flow_loss_official(logp[:4], zmean[:4], coverage[:4], boundary=-2.0)
    assert torch.isclose(normal_only, torch.nn.functional.softplus(-logp[:4]).mean())
    assert flow_loss_official(logp, zmean, coverage, boundary=-2.0) > normal_only
    # paper: plain NLL of normals; BG-SPP is zero when normals are above b_n and anomalies below b_n − τ
    assert torch.isclose(flow_loss_paper(logp, coverage, boundary=-2.0), -logp[:4].mean())
    assert flow_loss_paper(logp, coverage, boundary=0.0) > -logp[:4].mean()
    assert focal(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) < 1e-8
    ema = BoundaryEMA(beta=0.05)
    assert ema.update(torch.arange(101.0)) == 5.0
    assert math.isclose(ema.update(torch.arange(101.0) + 10), 0.9 * 5 + 0.1 * 15)


# ----------------------------------------------------------------------------------------------- model
def test_presets_and_overrides() -> None:
    official, paper = _resad(backbone_weights=None), _resad(preset="paper", backbone_weights=None)
    assert (official.model.bank.matching, official.model.bank.residual, official.model.score) == (
        "cosine", "sq_diff", "merged",
    )  # fmt: skip
    assert (paper.model.bank.matching, paper.model.bank.residual, paper.model.score) == ("l2", "diff", "likelihood")
    assert _resad(preset="paper", bank={"matching": "cosine"}, backbone_weights=None).model.bank.matching == "cosine"
    with pytest.raises(ValueError, match="preset"):
        ResAD(preset="neurips")
    # feature distribution matching: official on (1536 codes per level, third optimizer), paper off
    assert official.model.codebook is not None
    assert [official.model.codebook.codes(level).shape for level in range(2)] == [
        (1536, c) for c in official.model.backbone.channels
    ]
    assert (official.model.fdm_alpha, official.model.codebook.beta) == (0.4, 0.25)
    assert len(official.configure_optimizers()) == 3
    assert paper.model.codebook is None
    assert not any("codebook" in name for name in paper.state_dict())
    assert len(paper.configure_optimizers()) == 2
    assert (
        _resad(
            preset="paper", overrides={"fdm": True}, codebook={"codes": 8}, backbone_weights=None
        ).model.codebook.num_codes
        == 8
    )
    assert _resad(overrides={"fdm": False}, backbone_weights=None).model.codebook is None


# ----------------------------------------------------------------------------------------------- VQ + EFDM
def test_efdm_keeps_ranks_per_image_and_channel_and_alpha_one_is_the_identity() -> None:
    torch.manual_seed(0)
    residual, codes = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6) * 3 + 2
    matched = efdm(residual, codes, alpha=0.4)
    assert matched.shape == residual.shape
    assert torch.equal(matched.flatten(2).argsort(-1), residual.flatten(2).argsort(-1))
    sorted_r, sorted_q = residual.flatten(2).sort(-1).values, codes.flatten(2).sort(-1).values
    assert torch.allclose(matched.flatten(2).sort(-1).values, sorted_r + 0.6 * (sorted_q - sorted_r), atol=1e-6)
    other = codes.clone()
    other[1:] = 0  # other images do not matter: the matching is per image and channel
    other[0, 1:] = 0
    assert torch.equal(efdm(residual, other, alpha=0.4)[0, 0], matched[0, 0])
    assert torch.equal(efdm(residual, codes, alpha=1.0), residual)
    with pytest.raises(ValueError, match="alpha"):
        efdm(residual, codes, alpha=1.5)


def test_efdm_alpha_zero_gives_the_sorted_codes_in_the_rank_order_of_the_residual() -> None:
    r = torch.tensor([3.0, 1.0, 2.0]).reshape(1, 1, 1, 3)
    assert efdm(r, torch.tensor([10.0, 30.0, 20.0]).reshape(1, 1, 1, 3), alpha=0.0).flatten().tolist() == [
        30.0, 10.0, 20.0,
    ]  # fmt: skip
    torch.manual_seed(0)
    residual = torch.randn(2, 3, 4, 4)
    codes = torch.randint(0, 5, (2, 3, 4, 4)).float()  # ties, as in maps of nearest codes
    matched = efdm(residual, codes, alpha=0.0)
    order = residual.flatten(2).argsort(-1)
    assert torch.equal(matched.flatten(2).gather(-1, order), codes.flatten(2).sort(-1).values)


def test_efdm_ties_share_their_target_and_positions_permute_along() -> None:
    """Tied residual values (exact zeros of squared residuals) get one value, whatever order the sort gives them."""
    torch.manual_seed(0)
    residual = torch.rand(2, 3, 6, 6).round(decimals=1)  # many ties
    residual[:, :, :2] = 0
    codes = torch.rand(2, 3, 6, 6)
    matched = efdm(residual, codes, alpha=0.4)
    values, targets = residual.flatten(2), matched.flatten(2)
    for b, c in ((0, 0), (1, 2)):
        for value in values[b, c].unique():
            assert targets[b, c][values[b, c] == value].unique().numel() == 1
    assert (targets.gather(-1, values.argsort(-1)).diff(dim=-1) >= 0).all()  # order kept, ties stay tied
    assert torch.allclose(targets.sum(-1), 0.4 * values.sum(-1) + 0.6 * codes.flatten(2).sum(-1), atol=1e-5)
    permutation = torch.randperm(36)
    permuted = efdm(
        values[..., permutation].reshape(2, 3, 6, 6), codes.flatten(2)[..., permutation].reshape(2, 3, 6, 6)
    )
    assert torch.allclose(permuted.flatten(2), targets[..., permutation], atol=1e-6)


def test_codebook_and_efdm_export_to_openvino_with_ties(tmp_path) -> None:
    """nearest + EFDM through torch.onnx (dynamo) and OpenVINO, dynamic sizes, tied inputs: same values as torch."""
    ov = pytest.importorskip("openvino")
    torch.manual_seed(0)
    codebook = ResidualCodebook([8], num_codes=16)
    codebook.initialise([torch.rand(2, 8, 6, 6) * 3], [torch.ones(2, 6, 6, dtype=torch.bool)])

    class Matching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.codebook = codebook

        def forward(self, residual: torch.Tensor) -> torch.Tensor:
            return efdm(residual, self.codebook.nearest(0, residual), alpha=0.4)

    module = Matching().eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    path = tmp_path / "efdm.onnx"
    torch.onnx.export(module, (torch.rand(2, 8, 6, 6),), str(path), dynamo=True, opset_version=18,
                      dynamic_shapes=(dims,))  # fmt: skip
    compiled = ov.Core().compile_model(ov.convert_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    residual = (torch.rand(3, 8, 20, 12) * 3).round()
    residual[:, :, :4] = 0
    with torch.no_grad():
        expected = module(residual)
    assert abs(compiled([residual.numpy()])[0] - expected.numpy()).max() < 1e-5


def test_nearest_code_matches_brute_force() -> None:
    torch.manual_seed(0)
    codebook = ResidualCodebook([6, 3], num_codes=20)
    for level, channels in enumerate((6, 3)):
        codes = codebook.codes(level)
        with torch.no_grad():
            codes.normal_()
        residual = torch.randn(2, channels, 5, 4) * 2
        residual[0, :, 0, 0] = codes[7].detach()  # a residual equal to a code maps onto it
        rows = flatten_patches(residual)
        brute = ((rows[:, None, :] - codes[None].detach()) ** 2).sum(-1).argmin(1)
        nearest = codebook.nearest(level, residual)
        assert nearest.shape == residual.shape
        assert torch.equal(flatten_patches(nearest), codes.detach()[brute])
        assert torch.equal(nearest[0, :, 0, 0], codes[7].detach())


def test_codebook_loss_ignores_anomalous_positions_and_empty_levels() -> None:
    torch.manual_seed(0)
    codebook = ResidualCodebook([4, 4], num_codes=8, beta=0.25)
    with torch.no_grad():
        codebook.codes(0).uniform_(0, 1)
    residual = torch.rand(2, 4, 3, 3)
    normal = torch.ones(2, 3, 3, dtype=torch.bool)
    normal[0, 1, 2] = normal[1, 0, 0] = False
    spiked = residual.clone()
    spiked[0, :, 1, 2], spiked[1, :, 0, 0] = 1e4, -1e4  # anomalous positions only
    none = torch.zeros_like(normal)  # level 1: no normal position (the released code gets NaN there)
    loss = codebook.loss([residual, residual], [normal, none])
    assert torch.equal(loss, codebook.loss([spiked, spiked], [normal, none]))
    rows = flatten_patches(residual)[normal.reshape(-1)]
    codes = codebook.codes(0).detach()
    nearest = codes[((rows[:, None] - codes[None]) ** 2).sum(-1).argmin(1)]
    assert torch.isclose(loss, 1.25 * ((nearest - rows) ** 2).mean())  # (1 + β)·mse; only β trains the codes
    loss.backward()
    assert codebook.codes(1).grad is None
    empty = codebook.loss([spiked, spiked], [none, none])
    assert empty == 0
    assert not empty.requires_grad


def test_codebook_initialised_from_normal_residuals_converges() -> None:
    """Codes drawn from normal residuals, then the β-loss with Adam, reach the noise floor of clustered data.

    The released init U(−1/K, 1/K) with the same optimizer and steps stays far off (the reason for the data
    initialisation, see the ResAD README).
    """
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(4, 8, generator=generator) * 10
    noise = 0.5  # per-element variance of the clusters: 0.25, the best any 4 codes can do

    def residuals(count: int) -> torch.Tensor:
        rows = centres[torch.randint(4, (count * 16,), generator=generator)]
        rows = rows + noise * torch.randn(count * 16, 8, generator=generator)
        return rows.reshape(count, 4, 4, 8).permute(0, 3, 1, 2)

    train, held_out = residuals(16), residuals(16)
    anomalous = train.clone()
    anomalous[:, :, 0] = 1e3  # row 0 of every image is an anomaly: never drawn, never fitted
    normal = torch.ones(16, 4, 4, dtype=torch.bool)
    normal[:, 0] = False
    everywhere = torch.ones(16, 4, 4, dtype=torch.bool)

    def fit(codebook: ResidualCodebook) -> float:
        optimizer = torch.optim.Adam(codebook.param_groups(1e-2))  # ResAD's default codebook_lr
        for _ in range(200):
            loss = codebook.loss([anomalous], [normal])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return codebook.quantisation_error([held_out], [everywhere])

    torch.manual_seed(0)
    codebook = ResidualCodebook([8], num_codes=4)
    released = copy.deepcopy(codebook)
    assert codebook.codes(0).abs().max() <= 1 / 4
    at_released_init = codebook.quantisation_error([held_out], [everywhere])
    assert codebook.initialise([anomalous], [normal], generator=generator) == [0]
    assert codebook.codes(0).abs().max() < 20  # drawn from normal rows only
    at_init = codebook.quantisation_error([held_out], [everywhere])
    fitted = fit(codebook)
    print(f"quantisation error: released init {at_released_init:.3f}, data init {at_init:.3f}, fitted {fitted:.3f}")
    assert at_init < 0.1 * at_released_init
    assert fitted < 0.5 * at_init
    assert fitted < 1.2 * noise**2
    assert codebook.initialise([train], [everywhere]) == []  # initialised levels are never re-initialised
    released_fitted = fit(released)
    print(f"released init after the same 200 steps: {released_fitted:.3f}")
    assert released_fitted > 10 * fitted


def test_official_preset_trains_the_codebook_and_scores_with_efdm(cross_class, synthetic_root, tmp_path) -> None:
    from anomalib_cgad.models.base import load_images

    model, datamodule = _resad(), cross_class()
    codebook = model.model.codebook
    assert not codebook.initialised.any()
    _engine(tmp_path, limit_train_batches=2, limit_val_batches=0).fit(model=model, datamodule=datamodule)
    assert codebook.initialised.all()
    assert all(codebook.codes(level).abs().max() > 1 / codebook.num_codes for level in range(2))
    assert all(torch.isfinite(codebook.codes(level)).all() for level in range(2))

    model.eval()
    model.set_references(datamodule.reference_images("test", 0))
    paths = sorted((synthetic_root / "waves" / "test").rglob("*.png"))[:4]
    query = model.pre_processor.transform(load_images(paths, SIZE))
    with torch.no_grad():
        features = model.model.backbone(query)
        raw = model.model.bank.residuals(features)
        used = model.model.level_outputs(features, model.model.bank_tensors())[0]
        output = model.model(query)
        model.model.train()
        unmatched = model.model.level_outputs(features, model.model.bank_tensors())[0]
        model.model.eval()
    assert all(torch.equal(a, b) for a, b in zip(unmatched, raw, strict=True))  # training never applies EFDM
    assert all(not torch.equal(a, b) for a, b in zip(used, raw, strict=True))
    assert all(
        torch.equal(a, efdm(b, codebook.nearest(level, b), 0.4))
        for level, (a, b) in enumerate(zip(used, raw, strict=True))
    )
    assert torch.isfinite(output.pred_score).all()
    assert torch.isfinite(output.anomaly_map).all()


def test_forward_scores_against_the_bank_it_is_given(synthetic_root) -> None:
    from anomalib_cgad.models.base import load_images

    model = _resad().eval()

    def images(category: str, split: str = "train", kind: str = "good", count: int = 2) -> torch.Tensor:
        paths = sorted((synthetic_root / category / split / kind).glob("*.png"))[:count]
        return model.pre_processor.transform(load_images(paths, SIZE))

    model.model.set_reference(images("waves"))
    query = images("waves", "test")
    with torch.no_grad():
        stored = model.model(query)
        given = model.model.forward_with_bank(query, model.model.compute_bank(images("waves")))
        other = model.model.forward_with_bank(query, model.model.compute_bank(images("dots")))
    assert stored.pred_score.shape == (2,)
    assert stored.anomaly_map.shape == (2, 1, *SIZE)
    assert torch.isfinite(stored.anomaly_map).all()
    assert torch.allclose(stored.anomaly_map, given.anomaly_map)
    assert not torch.allclose(stored.anomaly_map, other.anomaly_map)
    assert torch.allclose(stored.pred_score, stored.anomaly_map.amax((-2, -1)).flatten())


def test_bank_file_round_trip_through_the_model(synthetic_root, tmp_path) -> None:
    from anomalib_cgad.models.base import load_images

    seed_everything(0)
    model = _resad()
    paths = sorted((synthetic_root / "waves" / "train" / "good").glob("*.png"))[:2]
    model.set_references(load_images(paths, SIZE))
    path = model.save_bank(tmp_path / "waves.npz")
    seed_everything(0)
    other = _resad()  # the same weights, no bank yet
    other.load_bank(path)
    assert all(torch.equal(a, b) for a, b in zip(model.model.bank_tensors(), other.model.bank_tensors(), strict=True))
    assert torch.equal(other.operating_point.reference_stats, model.operating_point.reference_stats)
    with pytest.raises(BankMismatchError, match="fingerprint"):  # a bank belongs to the weights that built it
        _resad().load_bank(path)
    with pytest.raises(BankMismatchError, match="layers"):
        _resad(layers=(1, 2)).load_bank(path)
    bigger = ResAD(visualizer=False, flow=FlowOptions(coupling_blocks=2, condition_dim=32))  # default 256 px input
    with pytest.raises(BankMismatchError, match="image_size"):
        bigger.load_bank(path)


@pytest.mark.slow
def test_plain_anomalib_datamodule_train_and_test(synthetic_root, tmp_path) -> None:
    """Plain anomalib usage: one MVTecAD-format class; training and test references come from its train split."""
    datamodule = MVTecAD(root=synthetic_root, category="waves", train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = _resad()
    engine = _engine(tmp_path, epochs=3)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)[0]
    assert set(model.training_pool.classes) == {"waves"}
    assert results["image_AUROC"] >= 0.9, results
    assert results["pixel_AUROC"] >= 0.9, results
    assert torch.isfinite(model.model.logp_max).all()


@pytest.mark.slow
def test_checkpoint_tested_on_another_class_uses_that_class_references(cross_class, synthetic_root, tmp_path) -> None:
    """anomalib restores a checkpoint after ``setup()``: the restored model must not keep the training run's bank."""
    from anomalib_cgad.models.base import load_images

    model = _resad()
    engine = _engine(tmp_path, epochs=2)
    engine.fit(model=model, datamodule=cross_class())
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    saved_bank = [t.clone() for t in model.model.bank_tensors()]

    target = MVTecAD(root=synthetic_root, category="waves", eval_batch_size=8, num_workers=0)
    fresh = _resad()
    results = _engine(tmp_path / "test").test(model=fresh, datamodule=target, ckpt_path=ckpt)[0]
    paths = sorted((synthetic_root / "waves" / "train" / "good").glob("*.png"))[: fresh.k_shot]
    with torch.no_grad():
        expected = fresh.model.compute_bank(fresh.pre_processor.transform(load_images(paths, SIZE)))
    banks = zip(fresh.model.bank_tensors(), expected, strict=True)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in banks)  # features reach ~50: float32 noise
    assert not all(
        a.shape == b.shape and torch.allclose(a, b) for a, b in zip(saved_bank, fresh.model.bank_tensors(), strict=True)
    )
    assert torch.equal(fresh.model.logp_max, model.model.logp_max)
    assert results["image_AUROC"] >= 0.9, results
    assert fresh.model.codebook.initialised.all()  # the official preset's codebook travels with the checkpoint
    assert all(torch.equal(fresh.model.codebook.codes(level), model.model.codebook.codes(level)) for level in range(2))

    reloaded = ResAD.load_from_checkpoint(ckpt, visualizer=False)
    reloaded.pre_processor = ResAD.configure_pre_processor(SIZE)
    refs = load_images(paths, SIZE)
    query = reloaded.pre_processor.transform(
        load_images(sorted((synthetic_root / "waves" / "test" / "good").glob("*.png")), SIZE)
    )
    scores = []
    for candidate in (fresh, reloaded):
        candidate.eval()
        candidate.set_references(refs)
        with torch.no_grad():
            scores.append(candidate.model(query).pred_score)
    assert torch.allclose(scores[0], scores[1], atol=1e-6)


def test_few_shot_source_folder_sets_the_bank(synthetic_root, tmp_path) -> None:
    """``few_shot_source`` beats the datamodule: the bank is built from the first k images of that folder."""
    from anomalib_cgad.models.base import load_images

    folder = synthetic_root / "waves" / "train" / "good"
    datamodule = MVTecAD(root=synthetic_root, category="dots", eval_batch_size=8, num_workers=0)
    model = _resad(few_shot_source=str(folder), k_shot=2)
    _engine(tmp_path).predict(model=model, datamodule=datamodule)
    with torch.no_grad():
        expected = model.model.compute_bank(
            model.pre_processor.transform(load_images(sorted(folder.glob("*.png"))[:2], SIZE))
        )
    banks = zip(model.model.bank_tensors(), expected, strict=True)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in banks)

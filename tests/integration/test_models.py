"""ResAD, MetaAD and CGAD end to end through anomalib's Engine on generated data, and their key properties."""

from __future__ import annotations

import math

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_cgad import CGAD, MetaAD, ResAD
from anomalib_cgad.components.backbone import FeatureExtractor
from anomalib_cgad.components.reference_bank import residual_features
from anomalib_cgad.models.metaad.torch_model import MetaADModel

IMAGENET = (torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None])


def _engine(tmp_path, epochs: int) -> Engine:
    return Engine(
        max_epochs=epochs, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False,
    )  # fmt: skip


def _small(model_cls, **kwargs):
    """The model at the generated images' own size (96 px) so tests stay fast on CPU."""
    return model_cls(pre_processor=model_cls.configure_pre_processor((96, 96)), visualizer=False, **kwargs)


def _fit_and_test(model, datamodule, tmp_path, epochs: int = 3) -> tuple[Engine, dict[str, float]]:
    engine = _engine(tmp_path, epochs)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)[0]
    return engine, results


@pytest.mark.parametrize(
    ("model_cls", "kwargs", "epochs", "min_auroc"),
    [(ResAD, {}, 3, 0.9), (CGAD, {}, 3, 0.9), (MetaAD, {}, 8, 0.8), (ResAD, {"preset": "paper"}, 3, 0.9)],
)
def test_train_then_test_on_an_unseen_class(model_cls, kwargs, epochs, min_auroc, cross_class, tmp_path) -> None:
    model = _small(model_cls, **kwargs)
    _, results = _fit_and_test(model, cross_class(), tmp_path, epochs)
    assert results["image_AUROC/waves"] == results["image_AUROC"]
    assert results["image_AUROC"] >= min_auroc, results
    assert results["pixel_AUROC"] >= 0.8, results
    assert model.training_pool.classes.keys() == {"stripes", "dots", "checker"}


def test_checkpoint_reload_gives_identical_scores(cross_class, tmp_path) -> None:
    datamodule = cross_class()
    model = _small(CGAD)
    engine = _engine(tmp_path, 2)
    engine.fit(model=model, datamodule=datamodule)
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    assert ckpt
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert any(key.endswith("bank.bank_0") for key in payload["state_dict"])
    reloaded = CGAD.load_from_checkpoint(ckpt, visualizer=False).eval()
    model.eval()
    images = torch.stack([datamodule.test_data[i].image for i in range(6)])
    refs = datamodule.reference_images("test", 0)
    scores = []
    for candidate in (model, reloaded):
        candidate.set_references(refs)
        with torch.no_grad():
            scores.append(candidate.model(candidate.pre_processor.transform(images)).pred_score)
    assert torch.allclose(scores[0], scores[1], atol=1e-5)


def test_no_max_epochs_trains_the_models_default_length_and_an_explicit_one_is_kept(cross_class, tmp_path) -> None:
    """``anomalib train`` without ``--trainer.max_epochs``: the model's ``demo_epochs``, not Lightning's 1000."""
    model = _small(MetaAD)
    model.demo_epochs = 2  # the class default is 4; 2 keeps the test short
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=cross_class())
    assert engine.trainer.current_epoch == 2
    explicit = _small(MetaAD)
    explicit.demo_epochs = 2
    _engine(tmp_path / "explicit", 1).fit(model=explicit, datamodule=cross_class())
    assert explicit.trainer.current_epoch == 1


def test_outer_level_off_really_skips_it(cross_class, tmp_path) -> None:
    model = _small(MetaAD, outer=False)
    _engine(tmp_path, 1).fit(model=model, datamodule=cross_class())
    assert model.outer_steps == 0
    on = _small(MetaAD)
    _engine(tmp_path / "on", 1).fit(model=on, datamodule=cross_class())
    assert on.outer_steps > 0


def test_outer_level_without_any_anomaly_is_skipped_with_one_warning(cross_class, tmp_path, caplog) -> None:
    """No labelled (``few_anomalies=0``) nor synthetic anomalies: CGAD trains its inner level only, and says so."""
    model = _small(CGAD, synthetic_per_class=0)
    with caplog.at_level("WARNING", logger="anomalib_cgad.models.episodic"):
        _engine(tmp_path, 1).fit(model=model, datamodule=cross_class())
    skipped = [r for r in caplog.records if r.getMessage().startswith("Outer level skipped: no anomalous patches")]
    assert len(skipped) == 1, [r.getMessage() for r in caplog.records]
    assert model.outer_steps == 0
    assert model.hardness == {}
    assert torch.equal(model.model.boundary, torch.zeros(2))  # the calibration optimiser never stepped
    assert model.trainer.global_step > 0


def test_inner_anomalies_add_bg_spp_to_the_inner_level(cross_class, tmp_path) -> None:
    """``inner_anomalies > 0``: the inner level also fits anomalies (ResAD's BG-SPP); ``0`` leaves it normal-only."""
    with pytest.raises(ValueError, match="inner_anomalies must be >= 0, got -1"):
        CGAD(inner_anomalies=-1)
    trained = {}
    for count in (0, 2):
        seed_everything(0)
        model = _small(CGAD, inner_anomalies=count, coupling_blocks=2, synthetic_per_class=4)
        _engine(tmp_path / str(count), 1).fit(model=model, datamodule=cross_class())
        trained[count] = model
    assert trained[0]._inner_boundaries is None
    boundaries = [ema.value for ema in trained[2]._inner_boundaries]
    assert len(boundaries) == 2 and all(b is not None and math.isfinite(b) for b in boundaries)
    flow = {name: p for name, p in trained[0].model.flow.named_parameters()}
    assert any(not torch.equal(flow[name], p) for name, p in trained[2].model.flow.named_parameters())


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
        model = _small(MetaAD, outer=outer, head=head)
        _engine(tmp_path / str(outer), 3).fit(model=model, datamodule=cross_class())
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


def test_normal_residuals_of_two_classes_are_closer_than_their_raw_features(synthetic_root) -> None:
    """ResAD's premise, measured on real backbone features of two generated classes."""
    from anomalib_cgad.models.base import load_images

    extractor = FeatureExtractor(layers=(2,))

    def feats(category: str, split: str, count: int) -> torch.Tensor:
        paths = sorted((synthetic_root / category / split / "good").glob("*.png"))[:count]
        images = (load_images(paths, (128, 128)) - IMAGENET[0]) / IMAGENET[1]
        return extractor(images)[0]

    stats = {}
    for category in ("stripes", "dots"):
        refs, queries = feats(category, "train", 4), feats(category, "test", 4)
        bank = refs.permute(0, 2, 3, 1).reshape(-1, refs.shape[1])
        residual = residual_features([queries], [bank])[0]
        stats[category] = (queries.mean((0, 2, 3)), residual.mean((0, 2, 3)))
    raw_gap = (stats["stripes"][0] - stats["dots"][0]).norm()
    residual_gap = (stats["stripes"][1] - stats["dots"][1]).norm()
    assert residual_gap < 0.5 * raw_gap, (float(raw_gap), float(residual_gap))


def test_reference_bank_switches_with_the_class(cross_class, tmp_path) -> None:
    """A normal image of class B scores lower against B's bank than against A's bank."""
    datamodule = cross_class()
    model = _small(ResAD)
    _engine(tmp_path, 2).fit(model=model, datamodule=datamodule)
    model.eval()
    target = datamodule.reference_images("test", 0)
    other = datamodule.reference_images("validate", 0)
    query = torch.stack([datamodule.test_data[i].image for i in range(len(datamodule.test_data))
                         if int(datamodule.test_data[i].gt_label) == 0][:3])  # fmt: skip
    scores = {}
    for name, refs in (("own", target), ("other", other)):
        model.set_references(refs)
        with torch.no_grad():
            scores[name] = model.model(model.pre_processor.transform(query)).pred_score.mean()
    assert scores["own"] < scores["other"], scores


def test_episodic_models_declare_their_steps_and_mixin_order() -> None:
    """EpisodicMixin's two steps are abstract (a model missing one is refused) and the mixins precede anomalib's."""
    from anomalib.models.components import AnomalibModule

    from anomalib_cgad.models.base import FewShotModuleMixin
    from anomalib_cgad.models.episodic import EpisodicMixin

    assert EpisodicMixin.__abstractmethods__ == frozenset({"_inner_step", "_outer_step"})

    class InnerOnly(EpisodicMixin, FewShotModuleMixin, AnomalibModule):
        def _inner_step(self, category, k, optimizer):
            return torch.zeros(())

    with pytest.raises(TypeError, match=r"abstract method '?_outer_step"):
        InnerOnly()
    for model_cls in (CGAD, MetaAD):
        mro = model_cls.__mro__
        assert not model_cls.__abstractmethods__
        assert mro.index(EpisodicMixin) < mro.index(FewShotModuleMixin) < mro.index(AnomalibModule)
        assert model_cls.training_step is EpisodicMixin.training_step
        assert model_cls.on_save_checkpoint is not AnomalibModule.on_save_checkpoint  # the tag is written
    assert ResAD.configure_evaluator is FewShotModuleMixin.configure_evaluator


@pytest.mark.parametrize("model_cls", [ResAD, MetaAD, CGAD])
def test_built_models_provide_what_their_mixins_declare(model_cls) -> None:
    """Each mixin's host Protocol (attributes and methods it uses from the model) holds for a built model."""
    from anomalib_cgad.models.checkpoints import CheckpointHost
    from anomalib_cgad.models.episodic import EpisodicHost, EpisodicMixin
    from anomalib_cgad.models.references import ReferenceHost

    model = model_cls(backbone_weights=None)
    assert isinstance(model, ReferenceHost)
    assert isinstance(model, CheckpointHost)
    if issubclass(model_cls, EpisodicMixin):
        assert isinstance(model, EpisodicHost)
    del model.few_shot_source  # a host that forgot an attribute no longer satisfies the contract
    assert not isinstance(model, ReferenceHost)

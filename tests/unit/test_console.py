"""A quiet console: Lightning's "💡 Tip" lines and its eval-mode warning for our frozen backbone are dropped,
every other message is kept."""

from __future__ import annotations

import logging
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

import anomalib_cgad  # noqa: F401  (installs the filter, as the start-up hook does for every anomalib run)
from anomalib_cgad.console import quiet_frozen_backbone_warning


def test_lightning_tips_are_dropped_and_other_info_is_kept(caplog) -> None:
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing litmodels")
        rank_zero_info("GPU available: False, used: False")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["GPU available: False, used: False"]


def test_only_the_eval_mode_warning_is_ignored_after_our_fit_starts() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_frozen_backbone_warning()
        rank_zero_warn("Found 265 module(s) in eval mode at the start of training.", category=PossibleUserWarning)
        rank_zero_warn("The dataloader does not have many workers", category=PossibleUserWarning)
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers"]

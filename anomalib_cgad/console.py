"""A quiet console: Lightning's advertising tips off, everything else (progress bars, real warnings) kept.

Lightning 2.6 prints, on every ``Trainer`` it builds, "💡 Tip: ... try installing litlogger ..." and
"💡 Tip: ... try installing litmodels ...": two lines per ``fit``/``test``/``predict`` through
``rank_zero_info``, with no flag to turn them off. They say nothing about the run, so importing the plugin
(which ``anomalib train|test|predict|export`` does at start-up) drops exactly those records with a
``logging.Filter`` on Lightning's ``rank_zero`` loggers.

Our models also keep their frozen, ImageNet-pretrained backbone in eval mode on purpose (its batch-norm
statistics must not drift to the training classes), and Lightning 2.6 answers every ``fit`` with
"Found 265 module(s) in eval mode at the start of training. This may lead to unexpected behavior"; it names no
fix because there is none to make. :func:`quiet_frozen_backbone_warning` ignores exactly that message, and only
from the moment one of our models starts fitting (its ``on_fit_start``). No other message is touched.
"""

from __future__ import annotations

import logging
import warnings

TIP_PREFIX = "💡 Tip:"
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class DropLightningTips(logging.Filter):
    """Drop log records that are Lightning's "💡 Tip:" advertisements."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record except a tip."""
        return not str(record.msg).startswith(TIP_PREFIX)


def quiet_lightning_tips() -> None:
    """Install :class:`DropLightningTips` on Lightning's rank-zero loggers (idempotent)."""
    for name in RANK_ZERO_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, DropLightningTips) for f in log.filters):
            log.addFilter(DropLightningTips())


EVAL_MODE_MESSAGE = r"Found \d+ module\(s\) in eval mode at the start of training"


def quiet_frozen_backbone_warning() -> None:
    """Ignore Lightning's "modules in eval mode" warning (our frozen backbone is in eval mode by design)."""
    warnings.filterwarnings("ignore", message=EVAL_MODE_MESSAGE)

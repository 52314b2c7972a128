"""Whether the current call is being traced or exported (one test for every cache and eager-only shortcut).

Values kept between calls (the flow's folded weights, the anomaly map's axis operators, the positional code)
must not leak into a traced graph as constants, and data-dependent Python (the coreset loop) cannot be traced;
both check :func:`is_tracing`.

Example:
    >>> is_tracing()
    False
"""

from __future__ import annotations

import torch


def is_tracing() -> bool:
    """``True`` inside ``torch.jit.trace``, ``torch.compile``/``torch.export`` and ``torch.onnx.export``."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()

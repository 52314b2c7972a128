"""The one check of a string option against its allowed values, with the message every model uses.

Example:
    >>> check_choice("head", "cosine", ("distance", "cosine"))
    >>> check_choice("head", "mlp", ("distance", "cosine"))
    Traceback (most recent call last):
    ...
    ValueError: head must be one of ('distance', 'cosine'), got 'mlp'.
"""

from __future__ import annotations

from collections.abc import Collection


def check_choice(name: str, value: object, choices: Collection) -> None:
    """Raise ``ValueError("<name> must be one of <choices>, got '<value>'.")`` unless ``value`` is allowed."""
    if value not in choices:
        msg = f"{name} must be one of {choices}, got '{value}'."
        raise ValueError(msg)

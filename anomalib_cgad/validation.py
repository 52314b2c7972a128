"""The checks of options shared by the models and datamodules, with the messages every one of them uses.

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


def check_count(name: str, value: object, minimum: int = 1, check_range: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a whole number (not a bool, str or float) ``>= minimum``.

    ``check_range=False`` checks the type only (for callers whose range message names several options).

    Example:
        >>> check_count("k_shot", "4")
        Traceback (most recent call last):
        ...
        ValueError: k_shot must be a whole number >= 1, got '4' (str).
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be a whole number >= {minimum}, got {value!r} ({type(value).__name__})."
        raise ValueError(msg)
    if check_range and value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}."
        raise ValueError(msg)

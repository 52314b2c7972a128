"""Attributes of a package imported on first use (PEP 562), so importing the package stays cheap (stdlib only).

``anomalib_cgad`` and ``anomalib_cgad.deploy`` export names whose modules need torch, anomalib and Lightning
next to names that need only numpy: with every name resolved on first access, the torch-free deployment path
(``anomalib_cgad.deploy.inferencer``, ``anomalib-cgad bank`` / ``predict-ov``) never imports torch.

Example:
    >>> namespace = {"__name__": "example"}
    >>> getattr_, dir_ = lazy_attributes(namespace, {"sqrt": "math"})
    >>> getattr_("sqrt")(4.0), "sqrt" in namespace, "sqrt" in dir_()
    (2.0, True, True)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_attributes"]


def lazy_attributes(
    namespace: dict, names: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` resolving ``names`` (attribute → module) on first access.

    Args:
        namespace (dict): the package's ``globals()``; a resolved name is stored there, so later look-ups
            are plain attribute reads.
        names (Mapping[str, str]): attribute name → the module that defines it.

    Returns:
        tuple: ``(__getattr__, __dir__)`` to assign in the package's ``__init__.py``.
    """

    def __getattr__(name: str) -> object:  # noqa: N807 - the module-level hook's required name
        module = names.get(name)
        if module is None:
            msg = f"module '{namespace['__name__']}' has no attribute '{name}'"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted({*namespace, *names})

    return __getattr__, __dir__

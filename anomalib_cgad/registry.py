"""Make anomalib's ``get_model`` and dict/``Namespace`` look-ups see the anomalib-cgad models.

The CLI (jsonargparse) finds any imported ``AnomalibModule`` subclass by its short name, and
``anomalib.models.get_model("cgad")`` scans the direct subclasses; both only need the classes to be
imported, which the start-up hook (``_anomalib_cgad_hook``) arranges. ``get_model({"class_path": "CGAD"})``
and ``from anomalib.models import CGAD`` additionally look the name up as an attribute of
``anomalib.models``: :func:`register` sets those attributes, never shadowing a built-in name.
"""

from __future__ import annotations

import logging

from anomalib.models.components import AnomalibModule

logger = logging.getLogger(__name__)


def register(*models: type[AnomalibModule]) -> list[str]:
    """Expose ``models`` as attributes of ``anomalib.models`` (guarded: never replaces an existing name).

    Args:
        *models: model classes, each a direct subclass of ``AnomalibModule``.

    Returns:
        list[str]: names that were newly registered.

    Raises:
        TypeError: a class does not list ``AnomalibModule`` among its direct bases, so ``get_model``
            would not find it.
    """
    import anomalib.models as anomalib_models

    registered = []
    for model in models:
        if AnomalibModule not in model.__bases__:
            msg = f"{model.__name__} must list AnomalibModule among its direct bases to be found by get_model()."
            raise TypeError(msg)
        existing = getattr(anomalib_models, model.__name__, None)
        if existing is None:
            setattr(anomalib_models, model.__name__, model)
            registered.append(model.__name__)
        elif existing is not model:
            logger.warning("anomalib.models.%s already exists; not replacing it.", model.__name__)
    return registered

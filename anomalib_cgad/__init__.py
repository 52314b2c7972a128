"""anomalib-cgad: class-generalizable anomaly detection models for anomalib.

Train one model on some product classes, then detect defects in a class it has never seen, given only
a few normal reference images of that class and no retraining.

Models (each a direct subclass of ``anomalib.models.AnomalibModule``):

- :class:`CGAD`: ResAD residuals trained with the multi-directional meta-learning outer loop (the default).
- :class:`ResAD`: residual-feature distribution learning (Yao et al., NeurIPS 2024).
- :class:`MetaAD`: multi-directional meta-learning (Roy et al., arXiv 2601.19833) on image patch features.

After ``pip install anomalib-cgad`` they are found by ``anomalib train --model CGAD`` and
``anomalib.models.get_model("cgad")`` with no extra flag (see ``_anomalib_cgad_hook``).

Importing this package is cheap: the model classes (torch, anomalib, Lightning) are imported on first use
(``anomalib_cgad.CGAD``, ``from anomalib_cgad import CGAD``), so the deployment path
(:mod:`anomalib_cgad.deploy.inferencer`, ``anomalib-cgad bank`` / ``predict-ov``) runs without torch.
Importing :mod:`anomalib_cgad.models` registers the models with anomalib.

Example:
    >>> import anomalib_cgad
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> model = anomalib_cgad.CGAD(few_shot_source="new_product/good")  # k normal images of the class to test
    >>> Engine().test(model, datamodule=MVTecAD(category="bottle"), ckpt_path="cgad.ckpt")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys

from anomalib_cgad.console import quiet_lightning_tips
from anomalib_cgad.lazy import lazy_attributes

__version__ = "0.1.0"
__all__ = ["CGAD", "MetaAD", "ResAD", "__version__"]

# Names resolved on first access (PEP 562) -> the module that defines them. The models need torch,
# anomalib and Lightning; a deployment that only reads a bank and runs OpenVINO must not pay for (or
# need) them.
_LAZY = {
    "CGAD": "anomalib_cgad.models",
    "MetaAD": "anomalib_cgad.models",
    "ResAD": "anomalib_cgad.models",
    "register": "anomalib_cgad.registry",
}


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)


# stdlib logging only: every run that imports the plugin (anomalib's CLI through the start-up hook) gets it.
quiet_lightning_tips()

# With anomalib's models already imported, torch is loaded anyway: register ours now. A start-up hook copied
# into site-packages before this package became lazy (an editable install not re-installed) imports
# ``anomalib_cgad`` right after ``anomalib.models`` and relies on this.
if "anomalib.models" in sys.modules:
    importlib.import_module("anomalib_cgad.models")

"""Start-up hook that makes anomalib see the anomalib-cgad models with no extra flag.

anomalib has no plugin mechanism: its CLI and ``get_model`` only know the subclasses of
``AnomalibModule`` that have been imported. This stdlib-only module is imported at interpreter
start by ``anomalib_cgad.pth`` (or, from Python 3.15 on, called through ``anomalib_cgad.start``).
It imports nothing heavy: it waits until ``anomalib.models`` is imported by someone, then imports
``anomalib_cgad`` right after it, so the CLI parser and ``get_model`` find ``ResAD``, ``MetaAD``
and ``CGAD``. A failing plugin import only produces a ``UserWarning``; anomalib keeps working.

It also waits for ``anomalib.cli.cli`` (anomalib's console script), which installs rich's traceback hook
when imported, and then puts the plugin's hook in front of it, so the plugin's own errors print as one line
(``anomalib_cgad.errors``); every other error still reaches rich's hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_TARGET = "anomalib.models"
_CLI = "anomalib.cli.cli"
_PLUGIN = "anomalib_cgad"


def _import_plugin() -> None:
    try:
        __import__(_PLUGIN)
    except Exception as exc:
        warnings.warn(f"anomalib-cgad could not register its models: {exc!r}", UserWarning, stacklevel=2)


def _install_error_hook() -> None:
    try:
        from anomalib_cgad.errors import install_excepthook

        install_excepthook()
    except Exception as exc:
        warnings.warn(f"anomalib-cgad could not install its error hook: {exc!r}", UserWarning, stacklevel=2)


class _AfterAnomalibModels(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps the loader of ``target`` to call ``after`` once the module has run."""

    def __init__(self, target: str = _TARGET, after=_import_plugin) -> None:
        self.target = target
        self.after = after

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        # Remove ourselves first, so the plugin's own imports cannot recurse into this finder.
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            self.after()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Arrange for ``anomalib_cgad`` to be imported right after ``anomalib.models``; never raises."""
    try:
        if _TARGET in sys.modules:
            _import_plugin()
            return
        if not any(isinstance(finder, _AfterAnomalibModels) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterAnomalibModels())
            if _CLI not in sys.modules:
                sys.meta_path.insert(0, _AfterAnomalibModels(_CLI, _install_error_hook))
    except Exception as exc:
        warnings.warn(f"anomalib-cgad start-up hook failed: {exc!r}", UserWarning, stacklevel=2)

"""Start-up hook that makes anomalib see the anomalib-cgad models with no extra flag.

anomalib has no plugin mechanism: its CLI and ``get_model`` only know the subclasses of
``AnomalibModule`` that have been imported. This stdlib-only module is imported at interpreter
start by ``anomalib_cgad.pth`` (or, from Python 3.15 on, called through ``anomalib_cgad.start``).
It imports nothing heavy: it waits until ``anomalib.models`` is imported by someone, then imports
``anomalib_cgad.models`` right after it (which registers them), so the CLI parser and ``get_model`` find
``ResAD``, ``MetaAD`` and ``CGAD``. When ``anomalib.models`` is first imported by one of the plugin's own
modules (``import anomalib_cgad.deploy.export_mixin`` imports ``anomalib.deploy``), the models are imported
right after that module has finished, not inside it (that would import it again, half run). A failing
plugin import only produces a ``UserWarning``; anomalib keeps working.

It also waits for ``anomalib.cli.cli`` (anomalib's console script), which installs rich's traceback hook
when imported, and then puts the plugin's hook in front of it, so the plugin's own errors print as one line
(``anomalib_cgad.errors``); every other error still reaches rich's hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
import warnings

_TARGET = "anomalib.models"
_CLI = "anomalib.cli.cli"
_PLUGIN = "anomalib_cgad.models"  # the package itself is lazy and would not import the models
_PACKAGE = "anomalib_cgad"


def _import_plugin() -> None:
    if _DEPTH.inside():
        # ``anomalib.models`` was imported by one of our own modules (say deploy/export_mixin.py, through
        # ``anomalib.deploy``) that has not finished running: importing the models now would import that
        # half-run module again and fail. They are imported as soon as the outermost one has finished.
        _DEPTH.pending = True
        return
    try:
        __import__(_PLUGIN)
    except Exception as exc:
        warnings.warn(f"anomalib-cgad could not register its models: {exc!r}", UserWarning, stacklevel=2)
    else:
        _DEPTH.remove()


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


class _PluginImportDepth(importlib.abc.MetaPathFinder):
    """Counts, per thread, the ``anomalib_cgad`` modules being run; runs a deferred plugin import after them.

    Finds nothing itself: for an ``anomalib_cgad`` module it asks the other finders and wraps the loader's
    ``exec_module`` with the count. Removed once the models are registered.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def pending(self) -> bool:
        return getattr(self._local, "pending", False)

    @pending.setter
    def pending(self, value: bool) -> None:
        self._local.pending = value

    def inside(self) -> bool:
        """Whether this thread is running the body of an ``anomalib_cgad`` module."""
        return getattr(self._local, "depth", 0) > 0

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _PACKAGE and not fullname.startswith(_PACKAGE + "."):
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module
        local = self._local

        def exec_module(module):
            local.depth = getattr(local, "depth", 0) + 1
            try:
                original_exec(module)
            finally:
                local.depth -= 1
            if local.depth == 0 and self.pending:  # only after a module that ran to its end
                self.pending = False
                _import_plugin()

        spec.loader.exec_module = exec_module
        return spec


_DEPTH = _PluginImportDepth()


def install() -> None:
    """Arrange for ``anomalib_cgad`` to be imported right after ``anomalib.models``; never raises."""
    try:
        if _TARGET in sys.modules:
            _import_plugin()
            return
        if not any(isinstance(finder, _AfterAnomalibModels) for finder in sys.meta_path):
            sys.meta_path.insert(0, _DEPTH)
            sys.meta_path.insert(0, _AfterAnomalibModels())
            if _CLI not in sys.modules:
                sys.meta_path.insert(0, _AfterAnomalibModels(_CLI, _install_error_hook))
    except Exception as exc:
        warnings.warn(f"anomalib-cgad start-up hook failed: {exc!r}", UserWarning, stacklevel=2)

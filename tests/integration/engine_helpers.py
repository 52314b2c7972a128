"""Shared pieces of the integration tests that train models through anomalib's Engine on the CPU."""

from __future__ import annotations

from anomalib.engine import Engine

from anomalib_cgad.models.options import regroup_arguments


def cpu_engine(tmp_path, epochs: int) -> Engine:
    """anomalib's Engine on one CPU, no logger and no progress bar, writing under ``tmp_path``."""
    return Engine(
        max_epochs=epochs, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False,
    )  # fmt: skip


def small_model(model_cls, **kwargs):
    """The model at the generated images' own size (96 px) so tests stay fast on CPU.

    ``kwargs`` may give options groups as partial mappings (``flow={"coupling_blocks": 2}``), laid over the model's
    defaults (:func:`~anomalib_cgad.models.options.regroup_arguments`).
    """
    kwargs = regroup_arguments(model_cls, kwargs)
    return model_cls(pre_processor=model_cls.configure_pre_processor((96, 96)), visualizer=False, **kwargs)


def fit_and_test(model, datamodule, tmp_path, epochs: int = 3) -> tuple[Engine, dict[str, float]]:
    """Fit on the datamodule's source classes, test on its unseen class; the engine and the test metrics."""
    engine = cpu_engine(tmp_path, epochs)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)[0]
    return engine, results

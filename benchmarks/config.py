"""Benchmark configuration: the presets, the model groups, reading and checking a protocol, resolving a model name.

A protocol (a preset in ``benchmarks/presets/`` or the user's own YAML, same schema) names its directions, models
(or *variants* of them), k values and reference seeds; see ``benchmarks/README.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PRESETS = Path(__file__).parent / "presets"
OURS = ("CGAD", "ResAD", "MetaAD")
BASELINES = ("PatchKNN",)
PEERS = ("Patchcore", "Padim", "WinClip", "AnomalyDINO")
ALL_MODELS = (*OURS, *BASELINES, *PEERS)


def load_config(preset: str | None = None, protocol: str | Path | None = None, quick: bool = False) -> dict:
    """Read a preset (by name, from ``benchmarks/presets``) or a protocol YAML, with its ``quick`` overrides.

    Args:
        preset (str | None): preset name, e.g. ``"elpv"``.
        protocol (str | Path | None): path of a protocol YAML (same schema as the presets).
        quick (bool): apply the file's ``quick:`` section on top. Defaults to ``False``.

    Returns:
        dict: the resolved configuration (``quick`` section removed).

    Raises:
        FileNotFoundError: unknown preset or missing file.
        ValueError: neither or both of ``preset`` / ``protocol``, or an invalid configuration.
    """
    if (preset is None) == (protocol is None):
        msg = "Give exactly one of --preset NAME or --protocol FILE.yaml."
        raise ValueError(msg)
    if preset is not None:
        path = PRESETS / f"{preset}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            msg = f"Unknown preset '{preset}'; available: {names}."
            raise FileNotFoundError(msg)
    else:
        path = Path(protocol)
        if not path.is_file():
            msg = f"Protocol file '{path}' does not exist."
            raise FileNotFoundError(msg)
    config = yaml.safe_load(path.read_text()) or {}
    quick_section = config.pop("quick", {}) or {}
    if quick:
        config.update(quick_section)
    config.setdefault("name", path.stem)
    validate_config(config)
    return config


def validate_config(config: dict) -> None:
    """Check the keys the runner needs; raise ``ValueError`` naming the problem."""
    for key in ("directions", "models", "k_shot", "seeds"):
        if not config.get(key):
            msg = f"Benchmark configuration needs a non-empty '{key}'."
            raise ValueError(msg)
    variants = config.get("variants") or {}
    for name, variant in variants.items():
        base = (variant or {}).get("model")
        if base not in (*OURS, *BASELINES):
            msg = f"Variant '{name}' needs 'model:' one of {[*OURS, *BASELINES]}, got {base!r}."
            raise ValueError(msg)
        if not isinstance(variant.get("args", {}), dict):
            msg = f"Variant '{name}': 'args' must be a mapping of constructor arguments."
            raise ValueError(msg)
        epochs = variant.get("epochs")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            msg = f"Variant '{name}': 'epochs' must be a positive integer, got {epochs!r}."
            raise ValueError(msg)
        size = variant.get("image_size")
        if size is not None and (not isinstance(size, int) or size < 32):
            msg = f"Variant '{name}': 'image_size' must be an integer >= 32, got {size!r}."
            raise ValueError(msg)
    unknown = [m for m in config["models"] if m not in ALL_MODELS and m not in variants]
    if unknown:
        msg = f"Unknown models {unknown}; choose from {list(ALL_MODELS)} or the protocol's variants {list(variants)}."
        raise ValueError(msg)
    if any(int(k) < 1 for k in config["k_shot"]):
        msg = f"k_shot values must be >= 1, got {config['k_shot']}."
        raise ValueError(msg)
    for direction in config["directions"]:
        for key in ("name", "source_dataset", "source_categories", "target_categories"):
            if key not in direction:
                msg = f"Direction {direction.get('name', direction)} misses '{key}'."
                raise ValueError(msg)


def resolve_model(name: str, config: dict) -> tuple[str, dict, int | None]:
    """Base model name, constructor arguments and training epochs of ``name`` (a protocol variant or a model).

    Epochs: the variant's own ``epochs``, else the protocol's, else ``None`` (the model's ``demo_epochs``).
    """
    variant = (config.get("variants") or {}).get(name)
    if variant is not None:
        return variant["model"], dict(variant.get("args") or {}), variant.get("epochs") or config.get("epochs")
    return name, dict(config.get("model_args", {}).get(name, {})), config.get("epochs")


def build_module(
    cls: type, image_size: tuple[int, int], options: dict | None = None, source: str = "arguments", **fixed: Any
):
    """A fresh ``cls`` at ``image_size`` (its own pre-processor, visualizer off), with protocol-style ``options``.

    ``options`` may hold options groups as (partial) mappings, dotted names or 0.1's flat names
    (:func:`~anomalib_cgad.models.options.regroup_arguments`; ``source`` names them in its warning); ``fixed``
    are the caller's own arguments (e.g. ``k_shot``).
    """
    from anomalib_cgad.models.options import regroup_arguments

    options = regroup_arguments(cls, options or {}, source=source)
    return cls(pre_processor=cls.configure_pre_processor(image_size), visualizer=False, **fixed, **options)


def describe(value: Any) -> str:  # pragma: no cover - convenience for the CLI
    """Short YAML text of a configuration."""
    return yaml.safe_dump(value, sort_keys=False)

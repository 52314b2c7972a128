"""Shipped YAML configs instantiate; the offline protocols set up completely."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _instantiate(section: dict):
    module, name = section["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**section.get("init_args", {}))


@pytest.mark.parametrize("path", sorted((CONFIGS / "protocols").glob("*.yaml")), ids=lambda p: p.stem)
def test_protocol_presets_instantiate(path: Path) -> None:
    datamodule = _instantiate(yaml.safe_load(path.read_text())["data"])
    assert not set(datamodule.source_categories) & set(datamodule.target_categories)
    if path.stem.startswith("elpv"):
        if importlib.util.find_spec("elpv_dataset") is None:
            pytest.skip("extra 'elpv' not installed")
        datamodule.setup()
        assert len(datamodule.test_data) > 0
        assert len(datamodule.reference_paths("test", 0)) == datamodule.k_shot


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_instantiate_with_every_argument(path: Path) -> None:
    section = yaml.safe_load(path.read_text())["model"]
    model = _instantiate(section)
    assert type(model).__name__ == section["class_path"].rsplit(".", 1)[1]

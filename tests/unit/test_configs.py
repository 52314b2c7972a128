"""Shipped YAML configs instantiate; the offline protocols set up completely."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest
import yaml

from anomalib_cgad.models.options import option_groups, regroup_arguments

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _instantiate(section: dict):
    module, name = section["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    return cls(**regroup_arguments(cls, section.get("init_args", {})))


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


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_spell_out_every_default(path: Path) -> None:
    """The shipped configs list every option of every group at the model's default (they are its reference)."""
    section = yaml.safe_load(path.read_text())["model"]
    module, name = section["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    built = regroup_arguments(cls, section["init_args"])
    parameters = inspect.signature(cls.__init__).parameters
    for group in option_groups(cls):
        default = parameters[group].default
        if default is None:  # ResAD's bank: null = the preset's
            assert section["init_args"][group] is None
            continue
        assert set(section["init_args"][group]) == {f.name for f in dataclasses.fields(default)}, group
        assert built[group] == default, group

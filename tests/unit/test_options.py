"""Options groups: protocol mappings, dotted and flat (0.1) names all build the same constructor arguments."""

from __future__ import annotations

import inspect
import logging

import pytest
from jsonargparse import ArgumentParser

from anomalib_cgad import CGAD, MetaAD, ResAD
from anomalib_cgad.components.distribution_matching import CodebookOptions
from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.components.reference_bank import BankOptions
from anomalib_cgad.models.base import FewShotModuleMixin
from anomalib_cgad.models.cgad.lightning_model import CGADTraining
from anomalib_cgad.models.episodic import EpisodeOptions
from anomalib_cgad.models.metaad.lightning_model import MetaADScoring
from anomalib_cgad.models.options import (
    constructor_parameters,
    option_groups,
    plain_hyperparameters,
    regroup_arguments,
)
from anomalib_cgad.models.resad.lightning_model import PresetOverrides, ResADTraining


def test_each_model_declares_its_groups() -> None:
    assert option_groups(CGAD) == {
        "bank": BankOptions, "flow": FlowOptions, "episodes": EpisodeOptions, "training": CGADTraining,
    }  # fmt: skip
    assert set(option_groups(MetaAD)) == {"scoring", "episodes", "training"}
    assert set(option_groups(ResAD)) == {"bank", "overrides", "flow", "codebook", "training"}


def test_a_partial_group_keeps_the_models_other_defaults() -> None:
    args = regroup_arguments(CGAD, {"episodes": {"outer": False}, "seed": 3})
    assert args == {"episodes": EpisodeOptions(outer=False), "seed": 3}
    assert regroup_arguments(CGAD, {"flow.coupling_blocks": 2}) == {"flow": FlowOptions(coupling_blocks=2)}
    given = EpisodeOptions(direction="single")
    assert regroup_arguments(MetaAD, {"episodes": given})["episodes"] is given  # an options object passes as is


def test_flat_names_of_version_0_1_map_to_their_groups_with_one_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="anomalib_cgad.models.options"):
        args = regroup_arguments(
            CGAD, {"condition_dim": 32, "reference_coreset": 0.5, "outer": False, "lr": 1e-3}, source="old.yaml"
        )
    assert args == {
        "flow": FlowOptions(condition_dim=32),
        "bank": BankOptions(coreset=0.5),
        "episodes": EpisodeOptions(outer=False),
        "training": CGADTraining(lr=1e-3),
    }
    (record,) = caplog.records
    assert record.getMessage().startswith("Old.yaml of CGAD use the flat names of anomalib-cgad 0.1")
    assert "reference_coreset → bank.coreset" in record.getMessage()
    metaad = regroup_arguments(MetaAD, {"head": "cosine", "learn_temperature": False, "inner_mode": "supervised"})
    assert metaad["scoring"] == MetaADScoring(head="cosine")
    assert metaad["episodes"] == EpisodeOptions(learn_temperature=False)


def test_resads_flat_bank_names_start_from_its_preset() -> None:
    """0.1's ResAD took ``matching=None`` as "the preset's": the regrouped bank starts from the preset's bank."""
    args = regroup_arguments(
        ResAD, {"preset": "paper", "matching": None, "reference_coreset": 0.5, "fdm": True, "fdm_lr": 1e-3}
    )
    assert args["bank"] == BankOptions(matching="l2", residual="diff", coreset=0.5)
    assert args["overrides"] == PresetOverrides(fdm=True)
    assert args["training"] == ResADTraining(codebook_lr=1e-3)
    model = ResAD(backbone_weights=None, **args)
    assert (model.model.bank.matching, model.model.bank.residual, model.options["occ"]) == ("l2", "diff", "paper")
    assert ResAD(backbone_weights=None, preset="paper").model.bank.matching == "l2"  # bank=None: the preset's
    assert regroup_arguments(ResAD, {"fdm_codes": 64})["codebook"] == CodebookOptions(codes=64)


def test_unknown_arguments_and_fields_are_named() -> None:
    with pytest.raises(ValueError, match=r"CGAD has no argument 'conditon_dim'; its arguments: \['backbone', "):
        regroup_arguments(CGAD, {"conditon_dim": 8})
    with pytest.raises(ValueError, match=r"CGAD's flow \(FlowOptions\) has no \['blocks'\]; it has"):
        regroup_arguments(CGAD, {"flow": {"blocks": 2}})
    with pytest.raises(ValueError, match="CGAD has no options group 'flows'; its groups:"):
        regroup_arguments(CGAD, {"flows.coupling_blocks": 2})
    with pytest.raises(ValueError, match=r"occ must be one of \('paper', 'log_barrier'\), got 'huber'"):
        regroup_arguments(ResAD, {"overrides": {"occ": "huber"}})
    with pytest.raises(ValueError, match="anomalies_per_class must be >= 0"):
        regroup_arguments(MetaAD, {"episodes": {"anomalies_per_class": -1}})


def test_flow_options_without_a_code_length_take_the_models_own() -> None:
    assert CGAD(backbone_weights=None, flow=FlowOptions(coupling_blocks=2)).model.flow.condition_dim == 16
    assert ResAD(backbone_weights=None, flow=FlowOptions(coupling_blocks=2)).model.flow.condition_dim == 128


def test_hyperparameters_are_saved_as_plain_mappings() -> None:
    plain = plain_hyperparameters({"flow": FlowOptions(coupling_blocks=2), "seed": 0, "backbone": "x"})
    assert plain == {"flow": {"coupling_blocks": 2, "condition_dim": None}, "seed": 0, "backbone": "x"}


SHARED = [
    "backbone", "layers", "backbone_weights", "k_shot", "few_shot_source", "false_alarm_rate", "seed",
    "pre_processor", "post_processor", "evaluator", "visualizer",
]  # fmt: skip


@pytest.mark.parametrize("model_cls", [CGAD, MetaAD, ResAD], ids=lambda c: c.__name__)
def test_shared_arguments_are_declared_once_and_reach_every_model(model_cls) -> None:
    """Each model declares only its own arguments and forwards the shared ones to ``FewShotModuleMixin``: the
    merged list has both, and jsonargparse (anomalib's CLI) builds ``--model.k_shot`` and the rest from it."""
    signature = inspect.signature(model_cls.__init__).parameters.values()
    own = [p.name for p in signature if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(signature)[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert not set(own) & set(SHARED), "a shared argument is declared again by the model"
    assert list(constructor_parameters(model_cls)) == [*own, *SHARED]
    assert list(constructor_parameters(FewShotModuleMixin)) == SHARED
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(model_cls, "model")
    config = parser.parse_args(["--model.k_shot", "8", "--model.false_alarm_rate", "0.1", "--model.seed", "3"])
    assert (config.model.k_shot, config.model.false_alarm_rate, config.model.seed) == (8, 0.1, 3)
    assert config.model.backbone == "tf_efficientnet_lite0"
    assert {*own, *SHARED} <= set(vars(config.model))
    with pytest.raises(TypeError, match="k_shots"):  # a misspelt shared argument is refused, not swallowed
        model_cls(backbone_weights=None, k_shots=4)

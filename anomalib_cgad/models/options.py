"""Grouped constructor arguments: the options objects of a model, built from mappings and written back as ones.

The models take the options a user rarely touches as one typed object per concern (``bank``, ``flow``,
``episodes``, ``training`` …; frozen dataclasses). Three places meet them as plain mappings instead, and
this module is the one translation for all of them:

- **protocol files and ``--set``** (the benchmarks): ``{"flow": {"condition_dim": 32}}`` becomes
  ``flow=FlowOptions(coupling_blocks=<the model's default>, condition_dim=32)``: a partial group is laid over
  the model's own default (its parameter's default object), not over the dataclass's;
- **the flat names of anomalib-cgad 0.1** (``condition_dim: 32``, ``reference_coreset: 0.5``), still read
  with a warning naming the grouped spelling, so older protocol files and checkpoints keep working;
- **checkpoints**: hyper-parameters are saved as plain mappings (:func:`plain_hyperparameters`), so a
  checkpoint loads with ``weights_only=True``, and are regrouped when the model is built from one.

Example:
    >>> from anomalib_cgad import CGAD
    >>> args = regroup_arguments(CGAD, {"bank": {"coreset": 0.5}, "seed": 1})
    >>> args["bank"], args["seed"]
    (BankOptions(matching='cosine', residual='sq_diff', coreset=0.5), 1)
    >>> regroup_arguments(CGAD, {"condition_dim": 32})["flow"]  # 0.1's flat name (logs a warning)
    FlowOptions(coupling_blocks=8, condition_dim=32)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "constructor_parameters",
    "flat_argument_names",
    "option_groups",
    "plain_hyperparameters",
    "regroup_arguments",
]


def _group_default(model_cls: type, name: str, parameter: inspect.Parameter, args: Mapping[str, Any]) -> Any:
    """What a partial group is laid over: the model's ``group_default(name, args)`` when it has one and it
    answers (a default that depends on another argument: ResAD's bank on its preset), else the declared one."""
    base = getattr(model_cls, "group_default", None)
    default = base(name, args) if base is not None else None
    return parameter.default if default is None else default


def constructor_parameters(model_cls: type) -> dict[str, inspect.Parameter]:
    """Every keyword a model's constructor takes: its own, then those its ``**kwargs`` forwards up the bases.

    The models declare their own arguments and forward the shared ones (backbone, references, false-alarm
    rate, seed, anomalib's four components) to ``FewShotModuleMixin.__init__`` through ``**kwargs``; jsonargparse
    resolves that forwarding the same way for ``--model.k_shot``. The walk follows the MRO's ``__init__``
    methods while each one ends in ``**kwargs``.

    Example:
        >>> from anomalib_cgad import CGAD
        >>> list(constructor_parameters(CGAD))[:6]
        ['bank', 'flow', 'episodes', 'training', 'backbone', 'layers']
    """
    parameters: dict[str, inspect.Parameter] = {}
    for klass in model_cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        forwards = False
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif name != "self" and parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                parameters.setdefault(name, parameter)
        if not forwards:
            break
    return parameters


def option_groups(model_cls: type) -> dict[str, type]:
    """The constructor's options objects: parameter name → dataclass (from the defaults and annotations)."""
    groups = {}
    hints = inspect.get_annotations(model_cls.__init__, eval_str=True)
    for name, parameter in inspect.signature(model_cls.__init__).parameters.items():  # groups: the model's own
        if dataclasses.is_dataclass(parameter.default):
            groups[name] = type(parameter.default)
            continue
        for candidate in getattr(hints.get(name), "__args__", ()):
            if dataclasses.is_dataclass(candidate):
                groups[name] = candidate
    return groups


def _takes_none(options: type, name: str) -> bool:
    field = next(f for f in dataclasses.fields(options) if f.name == name)
    return "None" in str(field.type)


def flat_argument_names(model_cls: type) -> dict[str, tuple[str, str]]:
    """Flat (0.1) argument name → (group, field): each field under its own name, plus the class's aliases."""
    groups = option_groups(model_cls)
    names = {field.name: (group, field.name) for group, cls in groups.items() for field in dataclasses.fields(cls)}
    for flat, dotted in getattr(model_cls, "FLAT_ALIASES", {}).items():
        group, field = dotted.split(".")
        names[flat] = (group, field)
    return names


def regroup_arguments(model_cls: type, args: Mapping[str, Any], source: str = "arguments") -> dict[str, Any]:
    """Constructor arguments of ``model_cls`` from a mapping with groups as mappings and/or flat 0.1 names.

    Args:
        model_cls (type): the model class (its ``__init__`` signature names the groups).
        args (Mapping[str, Any]): the arguments; a group may be an options object, a (partial) mapping laid
            over the model's default, dotted names (``"flow.coupling_blocks"``) or the flat names of
            anomalib-cgad 0.1.
        source (str): what the arguments come from, for the warning about flat names. Defaults to
            ``"arguments"``.

    Returns:
        dict[str, Any]: keyword arguments with every given group as its options object.

    Raises:
        ValueError: an argument the constructor does not have, or a group field the options object lacks.
    """
    parameters = constructor_parameters(model_cls)
    groups = option_groups(model_cls)
    flat = flat_argument_names(model_cls)
    out: dict[str, Any] = {}
    spread: dict[str, dict[str, Any]] = {}
    legacy = []
    for name, value in args.items():
        if "." in name:  # "flow.coupling_blocks": one field of a group (command-line style)
            group, _, field = name.partition(".")
            if group not in groups:
                msg = f"{model_cls.__name__} has no options group '{group}'; its groups: {sorted(groups)}."
                raise ValueError(msg)
            spread.setdefault(group, {})[field] = value
            continue
        grouped = isinstance(value, Mapping) or dataclasses.is_dataclass(value) or value is None
        if name in parameters and (name not in groups or grouped):
            out[name] = value
        elif name in flat:
            group, field = flat[name]
            legacy.append(f"{name} → {group}.{field}")
            if value is None and not _takes_none(groups[group], field):
                continue  # 0.1's "None: the preset's" of a field that now always has a value (ResAD's bank)
            spread.setdefault(group, {})[field] = value
        else:
            names = sorted(parameter for parameter in parameters if parameter != "self")
            msg = f"{model_cls.__name__} has no argument '{name}'; its arguments: {names}."
            raise ValueError(msg)
    if legacy:
        logger.warning(
            "%s of %s use the flat names of anomalib-cgad 0.1 (%s); write them grouped, e.g. {%s: {%s: ...}}.",
            source[:1].upper() + source[1:], model_cls.__name__, ", ".join(legacy), *flat[legacy[0].split(" ")[0]],
        )  # fmt: skip
    for name in {*spread, *(n for n, v in out.items() if n in groups and isinstance(v, Mapping))}:
        given = out.get(name)
        base = given if dataclasses.is_dataclass(given) else _group_default(model_cls, name, parameters[name], args)
        values = {**(dict(given) if isinstance(given, Mapping) else {}), **spread.get(name, {})}
        known = {field.name for field in dataclasses.fields(groups[name])}
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"{model_cls.__name__}'s {name} ({groups[name].__name__}) has no {unknown}; it has {sorted(known)}."
            raise ValueError(msg)
        out[name] = dataclasses.replace(base, **values) if base is not None else groups[name](**values)
    return out


def plain_hyperparameters(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` with every options object as a plain mapping (what a ``weights_only`` checkpoint can hold)."""
    return {
        key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value
        for key, value in hparams.items()
    }

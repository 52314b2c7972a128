"""CGAD: checkpoints, its outer level without anomalies, and the inner level's BG-SPP option."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import cpu_engine, small_model
from lightning.pytorch import seed_everything

from anomalib_cgad import CGAD
from anomalib_cgad.models.cgad.lightning_model import CGADTraining


def test_checkpoint_reload_gives_identical_scores_and_options(cross_class, tmp_path, caplog) -> None:
    """A checkpoint rebuilds the model's options groups by itself (saved as plain mappings, read weights-only),
    and one whose hyper-parameters use 0.1's flat names rebuilds the same model, with a warning."""
    datamodule = cross_class()
    model = small_model(CGAD, flow={"coupling_blocks": 2}, episodes={"inner_queries": 6}, training={"lr": 3e-4})
    engine = cpu_engine(tmp_path, 2)
    engine.fit(model=model, datamodule=datamodule)
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    assert ckpt
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert any(key.endswith("bank.bank_0") for key in payload["state_dict"])
    assert payload["hyper_parameters"]["flow"] == {"coupling_blocks": 2, "condition_dim": None}
    reloaded = CGAD.load_from_checkpoint(ckpt, visualizer=False).eval()
    assert (reloaded.hparams["flow"], reloaded.inner_queries, reloaded.lr) == (model.hparams["flow"], 6, 3e-4)

    flat = {key: value for key, value in payload["hyper_parameters"].items() if key not in ("flow", "episodes")}
    payload["hyper_parameters"] = {**flat, "coupling_blocks": 2, "condition_dim": 16, "inner_queries": 6}
    legacy = tmp_path / "flat_names.ckpt"
    torch.save(payload, legacy)
    with caplog.at_level("WARNING", logger="anomalib_cgad.models.options"):
        from_flat = CGAD.load_from_checkpoint(legacy, visualizer=False).eval()
    assert any("flat names of anomalib-cgad 0.1 (coupling_blocks → flow.coupling_blocks" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert (from_flat.model.flow.condition_dim, from_flat.inner_queries) == (16, 6)

    model.eval()
    images = torch.stack([datamodule.test_data[i].image for i in range(6)])
    refs = datamodule.reference_images("test", 0)
    scores = []
    for candidate in (model, reloaded, from_flat):
        candidate.set_references(refs)
        with torch.no_grad():
            scores.append(candidate.model(candidate.pre_processor.transform(images)).pred_score)
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    assert torch.allclose(scores[0], scores[2], atol=1e-5)


def test_outer_level_without_any_anomaly_is_skipped_with_one_warning(cross_class, tmp_path, caplog) -> None:
    """No labelled (``few_anomalies=0``) nor synthetic anomalies: CGAD trains its inner level only, and says so."""
    model = small_model(CGAD, training={"synthetic_per_class": 0})
    with caplog.at_level("WARNING", logger="anomalib_cgad.models.episodic"):
        cpu_engine(tmp_path, 1).fit(model=model, datamodule=cross_class())
    skipped = [r for r in caplog.records if r.getMessage().startswith("Outer level skipped: no anomalous patches")]
    assert len(skipped) == 1, [r.getMessage() for r in caplog.records]
    assert model.outer_steps == 0
    assert model.hardness == {}
    assert torch.equal(model.model.boundary, torch.zeros(2))  # the calibration optimiser never stepped
    assert model.trainer.global_step > 0


def test_inner_anomalies_add_bg_spp_to_the_inner_level(cross_class, tmp_path) -> None:
    """``inner_anomalies > 0``: the inner level also fits anomalies (ResAD's BG-SPP); ``0`` leaves it normal-only."""
    with pytest.raises(ValueError, match="inner_anomalies must be >= 0, got -1"):
        CGADTraining(inner_anomalies=-1)
    trained = {}
    for count in (0, 2):
        seed_everything(0)
        model = small_model(
            CGAD, training={"inner_anomalies": count, "synthetic_per_class": 4}, flow={"coupling_blocks": 2}
        )
        cpu_engine(tmp_path / str(count), 1).fit(model=model, datamodule=cross_class())
        trained[count] = model
    assert trained[0]._inner_boundaries is None
    boundaries = [ema.value for ema in trained[2]._inner_boundaries]
    assert len(boundaries) == 2 and all(b is not None and math.isfinite(b) for b in boundaries)
    flow = {name: p for name, p in trained[0].model.flow.named_parameters()}
    assert any(not torch.equal(flow[name], p) for name, p in trained[2].model.flow.named_parameters())


def test_class_adaptation_is_part_of_the_bank_and_meta_scale_is_learned(cross_class, tmp_path) -> None:
    """``adaptation``: the references' channel scales travel in the bank (saved, reloaded, refused when the
    model has none), and ``meta_scale``'s ``α``, ``β`` are moved by the outer level only."""
    with pytest.raises(ValueError, match="adaptation must be one of"):
        CGADTraining(adaptation="per_class")
    datamodule = cross_class()
    seed_everything(0)
    model = small_model(
        CGAD, training={"adaptation": "meta_scale", "synthetic_per_class": 4}, flow={"coupling_blocks": 2}
    )
    cpu_engine(tmp_path, 1).fit(model=model, datamodule=datamodule)
    exponents = torch.cat(list(model.model.scale_exponent))
    offsets = torch.cat(list(model.model.scale_offset))
    assert model.outer_steps > 0
    assert not torch.equal(exponents, torch.ones_like(exponents))
    assert not torch.equal(offsets, torch.zeros_like(offsets))

    model.eval()
    refs = datamodule.reference_images("test", 0)
    model.set_references(refs)
    images = model.pre_processor.transform(torch.stack([datamodule.test_data[i].image for i in range(4)]))
    with torch.no_grad():
        expected = model.model(images).pred_score
    scales = model.model.bank_tensors()[2:4]
    assert [tuple(s.shape) for s in scales] == [(c,) for c in model.model.backbone.channels]
    assert all(bool((s > 0).all()) for s in scales)
    path = model.save_bank(tmp_path / "adapted.npz")
    model.model.set_bank_tensors([*model.model.bank.tensors(), *[torch.ones_like(s) for s in scales],
                                  model.model.scale])  # fmt: skip
    model.load_bank(path)
    with torch.no_grad():
        assert torch.allclose(model.model(images).pred_score, expected)

    from anomalib_cgad.deploy import BankError

    plain = small_model(CGAD, flow={"coupling_blocks": 2}, training={"adaptation": "none"}).eval()
    plain.set_references(refs)
    with pytest.raises(BankError, match="adaptation: bank has 'meta_scale', model has 'none'"):
        plain.load_bank(path)
    centred = small_model(CGAD, flow={"coupling_blocks": 2}, training={"adaptation": "latent_centre"}).eval()
    centred.set_references(refs)
    with pytest.raises(BankError, match="adaptation: bank has 'meta_scale', model has 'latent_centre'"):
        centred.load_bank(path)

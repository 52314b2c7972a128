"""Determinism on CPU: the same seed gives the same references, episodes and scores."""

from __future__ import annotations

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_cgad import CGAD
from anomalib_cgad.components.episodes import EpisodeSampler
from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.models.cgad.lightning_model import CGADTraining


def test_same_seed_same_references(cross_class) -> None:
    def paths(seed: int) -> dict:
        datamodule = cross_class(reference_seed=seed, k_shot=3)
        datamodule.setup()
        return {
            stage: [datamodule.reference_paths(stage, i) for i in range(len(categories))]
            for stage, categories in (("validate", datamodule.val_categories), ("test", datamodule.test_categories))
        }

    first, second, other = paths(7), paths(7), paths(8)
    assert first == second
    assert all(len(refs) == 3 for stage in first.values() for refs in stage)
    assert first != other


def test_same_seed_same_episodes() -> None:
    classes = ["a", "b", "c", "d", "e"]

    def episodes(seed: int, direction: str) -> list:
        sampler = EpisodeSampler(classes, direction=direction, k_choices=(1, 2, 4), seed=seed)
        hardness = {}
        drawn = []
        for step in range(30):
            episode = sampler.sample(hardness)
            drawn.append(episode)
            hardness[episode.outer[0]] = step / 30  # feedback, as the models give it
        return drawn

    for direction in ("multi", "single"):
        assert episodes(3, direction) == episodes(3, direction)
        assert episodes(3, direction) != episodes(4, direction)


def _train_and_score(cross_class, tmp_path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    seed_everything(0, workers=True)
    datamodule = cross_class(source_categories=["stripes", "dots"], train_batch_size=12)
    model = CGAD(
        pre_processor=CGAD.configure_pre_processor((64, 64)), visualizer=False,
        flow=FlowOptions(coupling_blocks=2), training=CGADTraining(synthetic_per_class=2), seed=0,
    )  # fmt: skip
    engine = Engine(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )  # fmt: skip
    engine.fit(model=model, datamodule=datamodule)
    scores = torch.cat([batch.pred_score for batch in engine.predict(model=model, datamodule=datamodule)])
    return scores, {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_same_seed_same_scores_after_training_twice(cross_class, tmp_path) -> None:
    scores_a, weights_a = _train_and_score(cross_class, tmp_path / "a")
    scores_b, weights_b = _train_and_score(cross_class, tmp_path / "b")
    assert torch.isfinite(scores_a).all()
    assert len(scores_a) == 12
    assert weights_a.keys() == weights_b.keys()
    differing = [key for key in weights_a if not torch.equal(weights_a[key], weights_b[key])]
    assert differing == []
    assert torch.equal(scores_a, scores_b), (scores_a, scores_b)


@pytest.mark.slow
def test_demo_gives_the_same_numbers_twice(tmp_path) -> None:
    """``anomalib-cgad demo`` seeds weight initialisation too: two runs print the same metrics."""
    import argparse

    from anomalib_cgad.demo import add_demo_arguments

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(
        ["--dataset", "synthetic", "--k-shot", "2", "--epochs", "1", "--image-size", "64", "--out", str(tmp_path)]
    )
    first, second = args.func(args), args.func(args)
    assert first and first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0", "v1"]  # two result folders, nothing overwritten
    for name in ("scores_and_roc.png", "most_and_least_anomalous.png", "metrics.md"):  # the demo's three plots
        assert (tmp_path / "v0" / name).stat().st_size > 0, name
    assert "patch-kNN with the same backbone and references" in (tmp_path / "v0" / "metrics.md").read_text()

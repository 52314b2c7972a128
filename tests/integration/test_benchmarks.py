"""The benchmark runner end to end on generated data, plus its metric and configuration helpers."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

SOURCES = ("stripes", "dots", "checker")  # the classes of the synthetic_root fixture (conftest.py)
TARGETS = ("waves",)


def _config(root) -> dict:
    return {
        "name": "tiny",
        "models": ["CGAD", "PatchKNN", "Patchcore", "WinClip"],
        "k_shot": [1, 2],
        "seeds": [0],
        "epochs": 1,
        "image_size": 64,
        "train_batch_size": 8,
        "eval_batch_size": 16,
        "model_args": {"CGAD": {"flow": {"coupling_blocks": 2}, "training": {"synthetic_per_class": 4}}},
        "directions": [
            {
                "name": "textures_to_waves",
                "source_dataset": "MVTecAD",
                "source_root": str(root),
                "source_categories": list(SOURCES),
                "target_categories": list(TARGETS),
            }
        ],
    }


def test_runner_writes_results_tables_and_plots(synthetic_root, tmp_path) -> None:
    from benchmarks.runner import run_benchmark

    folder = run_benchmark(_config(synthetic_root), tmp_path / "out")
    assert folder == tmp_path / "out" / "tiny" / "v0"
    frame = pd.read_csv(folder / "results.csv")
    ok = frame[frame.status == "ok"]
    assert sorted(zip(ok.model, ok.k_shot, strict=True)) == sorted(
        (m, k) for m in ("CGAD", "PatchKNN", "Patchcore") for k in (1, 2)
    )
    assert set(ok["class"]) == set(TARGETS)
    for column in (
        "image_AUROC",
        "pixel_AUROC",
        "AUPRO",
        "F1_transferred",
        "F1_oracle",
        "F1_normal_only",
        "false_alarm_rate",
        "miss_rate",
        "false_alarm_rate_at_0.01",
        "false_alarm_rate_at_0.1",
    ):
        assert ok[column].between(0, 1).all(), ok[column]  # every model, peers too, has a normal-only label
    assert (ok["false_alarm_rate_at_0.01"] <= ok["false_alarm_rate_at_0.1"]).all()
    knn = ok[ok.model == "PatchKNN"]
    assert (knn.image_AUROC > 0.7).all(), knn.image_AUROC
    # the trained model is reused: only the references change with k (bank size = k, different files)
    for model in ("CGAD", "PatchKNN"):
        rows = ok[ok.model == model].sort_values("k_shot")
        assert rows.bank_refs.tolist() == [1, 2]
        assert [len(r.split(";")) for r in rows.references] == [1, 2]
    winclip = frame[frame.model == "WinClip"]
    assert len(winclip) == 2
    assert all(s == "ok" or s.startswith("skipped") for s in winclip.status)
    summary = (folder / "summary.md").read_text()
    assert "| PatchKNN |" in summary
    assert "k=1" in summary
    assert "## Normal-only operating point" in summary
    plots = ("auroc_vs_k_textures_to_waves.png", "per_class_bar.png", "false_alarm_rate.png")
    for name in (*plots, "speed.csv", "speed.md"):
        assert (folder / name).stat().st_size > 0, name
    assert len(list((folder / "overlays").glob("*.png"))) == 3
    speed = pd.read_csv(folder / "speed.csv")
    assert set(speed.model) == {"CGAD", "PatchKNN", "Patchcore"}
    assert (speed.test_images_per_s > 0).all()


@pytest.mark.slow
def test_synthetic_loco_quick_holds_out_each_class_and_the_trained_model_beats_patch_knn(tmp_path) -> None:
    """``--preset synthetic_loco --quick`` (about 40 s): five directions on faint generated defects."""
    from benchmarks.runner import load_config, run_benchmark

    folder = run_benchmark(load_config(preset="synthetic_loco", quick=True), tmp_path / "out")
    assert (folder / "data" / "waves" / ".synthetic").read_text().endswith("-0.2")  # faint defects were made
    frame = pd.read_csv(folder / "results.csv")
    assert (frame.status == "ok").all(), frame.status
    assert sorted(frame["class"].unique()) == ["checker", "dots", "stripes", "washer", "waves"]
    mean = frame.groupby("model").image_AUROC.mean()
    assert mean["CGAD"] > mean["PatchKNN"] + 0.05, mean  # measured: 0.860 vs 0.722
    summary = (folder / "summary.md").read_text()
    assert summary.index("## All 5 directions") < summary.index("## to_stripes")


def test_class_metrics_splits_clear_and_subtle() -> None:
    from benchmarks.runner import class_metrics

    scores = torch.tensor([10.0, 20.0, 90.0, 30.0, 15.0])  # raw scores, outside [0, 1] on purpose
    labels = torch.tensor([0, 0, 1, 1, 1])
    probability = np.array([0.0, 0.0, 1.0, 2 / 3, 1 / 3])
    out = class_metrics(scores, labels, threshold=25.0, probability=probability)
    assert out["image_AUROC_clear"] == 1.0
    assert out["image_AUROC_subtle"] == pytest.approx(0.75)
    assert out["image_AUROC"] == pytest.approx(5 / 6)
    assert out["F1_transferred"] == pytest.approx(0.8)  # 2 of 3 anomalies above 25, no false positive
    assert math.isnan(out["pixel_AUROC"])


def test_normal_only_metrics_count_false_alarms_and_misses_per_requested_rate() -> None:
    from benchmarks.runner import normal_only_metrics

    scores = torch.tensor([0.1, 0.4, 0.6, 0.9, 0.3, 0.7, 0.8])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    out = normal_only_metrics(scores, labels, {0.01: 0.85, 0.05: 0.5, 0.1: 0.35}, rate=0.05)
    assert out["false_alarm_rate"] == pytest.approx(0.5)  # 0.6 and 0.9 of the four normals
    assert out["miss_rate"] == pytest.approx(1 / 3)  # 0.3
    assert out["F1_normal_only"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert out["false_alarm_rate_at_0.01"] == pytest.approx(0.25)
    assert out["false_alarm_rate_at_0.1"] == pytest.approx(0.75)  # 0.4 is above 0.35 too
    assert math.isnan(normal_only_metrics(scores, labels, None, 0.05)["F1_normal_only"])


def test_summary_averages_over_held_out_classes_and_flags_missing_ones() -> None:
    import pandas as pd

    from benchmarks.report import across_directions_tables

    def row(direction, model, seed, auroc, status="ok"):
        return {"direction": direction, "model": model, "k_shot": 4, "seed": seed, "class": direction[-1],
                "status": status, "image_AUROC": auroc}  # fmt: skip

    rows = [row("to_a", "M", 0, 0.8), row("to_a", "M", 1, 0.6), row("to_b", "M", 0, 0.9), row("to_b", "M", 1, 0.9)]
    rows += [row("to_a", "P", 0, 0.5), row("to_b", "P", 0, float("nan"), status="failed: NaN scores")]
    frame = pd.DataFrame(rows)
    table = across_directions_tables(frame, ["M", "P"])
    assert "## All 2 directions" in table
    # M: seed means 0.7 (to_a) and 0.9 (to_b): mean 0.8, std over the two directions 0.141
    assert "| M | 0.800 ± 0.141 |" in table
    assert "| P | 0.500 (1/2) |" in table  # failed in one direction: said, not averaged away
    assert across_directions_tables(frame[frame.direction == "to_a"], ["M"]) == ""


def test_configuration_errors_are_clear(tmp_path) -> None:
    from benchmarks.runner import load_config, next_run_folder, validate_config

    with pytest.raises(FileNotFoundError, match="Unknown preset"):
        load_config(preset="nope")
    with pytest.raises(ValueError, match="exactly one"):
        load_config()
    quick = load_config(preset="elpv", quick=True)
    assert quick["k_shot"] == [1, 4]
    assert [d["name"] for d in quick["directions"]] == ["mono_to_poly", "poly_to_mono"]
    assert load_config(preset="elpv")["k_shot"] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="Unknown models"):
        validate_config({**quick, "models": ["Nope"]})
    assert next_run_folder(tmp_path, "x").name == "v0"
    assert next_run_folder(tmp_path, "x").name == "v1"  # never reuses an existing folder


def test_protocol_variants_build_the_base_model_with_their_arguments() -> None:
    from benchmarks.runner import build_ours, load_config, validate_config

    config = load_config(preset="elpv_metaad_ablation")
    assert config["models"][0] == "MetaAD"
    assert len(config["models"]) == 12
    config = {**config, "image_size": 64}
    outer_off = build_ours("outer_off", config, 4)
    cosine = build_ours("head_cosine", config, 2)
    default = build_ours("MetaAD", config, 4)
    assert type(outer_off).__name__ == "MetaAD"
    assert outer_off.outer is False and default.outer is True
    assert cosine.model.head_type == "cosine" and default.model.head_type == "distance"
    assert cosine.k_shot == 2
    with pytest.raises(ValueError, match="Variant 'bad' needs 'model:'"):
        validate_config({**config, "variants": {"bad": {"model": "Nope"}}})
    with pytest.raises(ValueError, match="Unknown models"):
        validate_config({**config, "models": ["not_a_variant"]})


@pytest.mark.parametrize("quick", [False, True])
def test_every_preset_loads_and_validates(quick: bool) -> None:
    from benchmarks.runner import PRESETS, load_config, validate_config

    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert "synthetic_loco" in names
    for name in names:
        validate_config(load_config(preset=name, quick=quick))


def test_synthetic_loco_holds_each_class_out_once_with_faint_defects() -> None:
    from benchmarks.runner import build_ours, load_config

    config = load_config(preset="synthetic_loco")
    directions = config["directions"]
    targets = [d["target_categories"] for d in directions]
    classes = ["checker", "dots", "stripes", "washer", "waves"]
    assert sorted(t for [t] in targets) == classes
    for direction in directions:
        assert sorted([*direction["source_categories"], *direction["target_categories"]]) == classes
        assert direction["generate"]["defect_strength"] == 0.2
    config = {**config, "image_size": 64}
    assert build_ours("single_direction", config, 4).direction == "single"
    assert build_ours("inner_only", config, 4).outer is False
    assert build_ours("CGAD", config, 4).direction == "multi"


def test_patch_knn_scores_a_pasted_defect_higher() -> None:
    from benchmarks.patch_knn import PatchKNNModel

    torch.manual_seed(0)
    model = PatchKNNModel().eval()
    normal = torch.zeros(2, 3, 64, 64)
    model.set_reference(normal)
    defect = normal[:1].clone()
    defect[:, :, 20:36, 20:36] = 2.0
    out = model(torch.cat([normal[:1], defect]))
    assert out.pred_score[1] > out.pred_score[0] + 1e-3
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    assert out.anomaly_map[1, 0, 28, 28] > out.anomaly_map[1, 0, 2, 2]


def test_deploy_speed_builds_the_model_with_the_given_constructor_arguments() -> None:
    from benchmarks.deploy_speed import build_model, parse_args

    args = parse_args(["--image-size", "64", "--set", "flow.coupling_blocks=2", "flow.condition_dim=32"])
    assert args.set == {"flow.coupling_blocks": 2, "flow.condition_dim": 32}
    model = build_model("CGAD", 64, 2, 0, args.set)
    assert len(model.model.flow.flows[0].module_list) == 2
    assert model.model.flow.condition_dim == 32
    assert model.model.bank.is_set
    with pytest.raises(SystemExit):
        parse_args(["--set", "coupling_blocks"])  # argparse reports the KEY=VALUE format and exits
    with pytest.raises(ValueError, match="CGAD has no options group 'flows'"):
        build_model("CGAD", 64, 2, 0, {"flows.coupling_blocks": 2})


def test_deploy_speed_times_every_component_in_each_round_and_parses_a_comparison() -> None:
    from benchmarks.deploy_speed import _variants, parse_args, timed_rounds

    calls: list[str] = []
    medians = timed_rounds([lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.002))], 1, 3)
    assert calls == ["a", "b"] * 4  # one warm-up round, three timed rounds, interleaved
    assert medians[1] >= 0.002 > medians[0]
    args = parse_args(["--set", "flow.coupling_blocks=2", "--compare", "bank.coreset=0.5"])
    assert _variants(args) == [
        ("CGAD", {"flow.coupling_blocks": 2}),
        ("CGAD (bank.coreset=0.5)", {"flow.coupling_blocks": 2, "bank.coreset": 0.5}),
    ]
    assert _variants(parse_args([])) == [("CGAD", {})]


def test_deploy_speed_counts_the_arithmetic_of_each_part() -> None:
    """The model's FLOPs split into its parts; ``other`` is exactly the nearest-reference search's products."""
    from benchmarks.deploy_speed import build_model, flops_per_image, model_parts

    model = build_model("CGAD", 64, 2, 0)
    image = torch.rand(1, 3, 64, 64)
    total, per_module = flops_per_image(model, image)
    parts = model_parts(per_module, "CGAD.model")
    assert set(parts) == {"backbone", "constraintor", "flow", "anomaly_map_generator", "other"}
    assert sum(parts.values()) == total
    assert parts["backbone"] == flops_per_image(model.model.backbone, model.pre_processor.transform(image))[0]
    # cosine search: one (H·W × C) @ (C × k·H·W) product per level, 2 FLOPs per multiply-add
    search = sum(
        2 * (64 // s) ** 2 * 2 * (64 // s) ** 2 * c for s, c in zip((8, 16), model.model.backbone.channels, strict=True)
    )
    assert parts["other"] == search
    coreset = model_parts(flops_per_image(build_model("CGAD", 64, 2, 0, {"bank.coreset": 0.5}), image)[1], "CGAD.model")
    assert coreset["other"] == pytest.approx(search / 2, rel=0.05)
    assert coreset["flow"] == parts["flow"]


@pytest.mark.slow
def test_deploy_speed_writes_latency_and_arithmetic_tables(tmp_path) -> None:
    """One tiny end-to-end run: torch and OpenVINO rows, FLOP columns on the torch rows, the parts table."""
    import csv

    from benchmarks.deploy_speed import main

    out = tmp_path / "speed"
    threads = torch.get_num_threads()
    main(["--image-size", "64", "--batch-sizes", "1", "--iterations", "1", "--warmup", "0", "--threads", "1",
          "--no-bf16", "--out", str(out)])  # fmt: skip
    assert torch.get_num_threads() == threads  # --threads applied to the run only (later tests compare processes)
    folder = out / "CGAD_64px" / "v0"  # the first version folder, as for every run folder
    with (folder / "results.csv").open() as handle:
        rows = {(r["component"], r["runtime"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {(c, r) for c in ("backbone", "CGAD") for r in ("torch", "OpenVINO")}
    assert float(rows["CGAD", "torch"]["flops_vs_backbone"]) > 1.0
    assert float(rows["backbone", "torch"]["mflop_per_image"]) > 0
    assert rows["CGAD", "OpenVINO"]["mflop_per_image"] == "nan"
    assert all(float(r["ms_per_image"]) > 0 for r in rows.values())
    markdown = (folder / "results.md").read_text()
    assert "| CGAD | flow |" in markdown and "| CGAD | other |" in markdown


@pytest.mark.slow
def test_grid_tasks_run_apart_and_the_last_one_merges(synthetic_root, tmp_path, monkeypatch) -> None:
    """Each (direction, model) task runs alone (as a job-array element would); the last to finish merges."""
    from benchmarks import grid
    from benchmarks.__main__ import main

    config = {**_config(synthetic_root), "models": ["PatchKNN", "Patchcore"], "k_shot": [1]}
    assert [t["name"] for t in grid.tasks(config)] == ["textures_to_waves__PatchKNN", "textures_to_waves__Patchcore"]
    grid.run_task(config, 1, tmp_path)
    root = tmp_path / "tiny"
    assert not (root / "merged").exists()  # one task is still missing
    assert grid.missing_tasks(config, root) == ["textures_to_waves__PatchKNN"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    grid.run_task(config, grid.task_index("env", 2), tmp_path)
    merged = pd.read_csv(root / "merged" / "v0" / "results.csv")
    assert set(merged[merged.status == "ok"].model) == {"PatchKNN", "Patchcore"}
    assert "| PatchKNN |" in (root / "merged" / "v0" / "summary.md").read_text()
    assert main(["merge", str(root)]) == 0  # by hand: a new merged version, the same rows
    assert pd.read_csv(root / "merged" / "v1" / "results.csv").equals(merged)
    with pytest.raises(ValueError, match=r"--task must be an index in 0\.\.1"):
        grid.task_index("2", 2)


def test_merge_joins_runs_split_by_direction_and_never_overwrites(tmp_path) -> None:
    import yaml

    from benchmarks.report import merge_runs

    folders = []
    for direction, f1 in (("to_a", 0.7), ("to_b", 0.9)):
        folder = tmp_path / direction
        folder.mkdir()
        config = {"name": "p", "models": ["CGAD"], "k_shot": [4], "seeds": [0], "directions": [{"name": direction}]}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        row = {"direction": direction, "model": "CGAD", "k_shot": 4, "seed": 0, "class": direction[-1],
               "status": "ok", "image_AUROC": 0.8, "F1_oracle": 1.0, "F1_normal_only": f1, "miss_rate": 0.1,
               "false_alarm_rate_at_0.01": 0.0, "false_alarm_rate_at_0.05": 0.05,
               "false_alarm_rate_at_0.1": 0.1}  # fmt: skip
        pd.DataFrame([row]).to_csv(folder / "results.csv", index=False)
        (folder / "summary.md").write_text(f"wall time {10 * f1:.1f} min.")
        folders.append(folder)
    out = merge_runs(folders, tmp_path / "merged")
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.direction) == ["to_a", "to_b"]
    assert [d["name"] for d in yaml.safe_load((out / "config.yaml").read_text())["directions"]] == ["to_a", "to_b"]
    summary = (out / "summary.md").read_text()
    assert "wall time 9.0 min" in summary and "| CGAD | 0.800 ± 0.141 |" in summary
    assert (out / "false_alarm_rate.png").stat().st_size > 0
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        merge_runs(folders, out)
    # runs split by model over the same directions: each direction once in the merged config
    again = merge_runs([*folders, out], tmp_path / "merged_again")
    assert [d["name"] for d in yaml.safe_load((again / "config.yaml").read_text())["directions"]] == ["to_a", "to_b"]

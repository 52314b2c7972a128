"""The backbone × resolution table merges split benchmark runs without losing or double-counting a pass."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from benchmarks.backbone_table import merge


def _run(folder, variants: dict, rows: list[tuple], speed: list[tuple]):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"image_size": 160, "variants": variants}))
    columns = ["direction", "model", "k_shot", "seed", "class", "status", "image_AUROC", "image_AUROC_clear"]
    pd.DataFrame(rows, columns=columns).to_csv(folder / "results.csv", index=False)
    speed_columns = ["direction", "model", "train_s", "test_images", "test_images_per_s", "peak_rss_mb"]
    pd.DataFrame(speed, columns=speed_columns).to_csv(folder / "speed.csv", index=False)
    return folder


def test_merge_writes_one_row_per_backbone_and_size(tmp_path) -> None:
    a = _run(
        tmp_path / "a",
        {"small": {"model": "PatchKNN", "args": {"backbone": "tf_efficientnet_lite0"}}},
        [("m2p", "small", 4, 0, "poly", "ok", 0.70, 0.80), ("m2p", "small", 4, 1, "poly", "ok", 0.80, 0.90),
         ("p2m", "small", 4, 0, "mono", "ok", 0.60, 0.70), ("p2m", "small", 4, 1, "mono", "ok", 0.60, 0.70)],
        [("m2p", "small", 0.0, 100, 50.0, 900), ("p2m", "small", 0.0, 100, 25.0, 1000)],
    )  # fmt: skip
    b = _run(
        tmp_path / "b",
        {"big": {"model": "PatchKNN", "image_size": 256, "args": {"backbone": "tf_efficientnet_lite2"}}},
        [("m2p", "big", 4, 0, "poly", "ok", 0.90, 0.95), ("p2m", "big", 4, 0, "mono", "ok", 0.50, 0.55)],
        [("m2p", "big", 0.0, 10, 10.0, 2000), ("p2m", "big", 0.0, 10, 10.0, 1500)],
    )  # fmt: skip
    out = merge([a, b], tmp_path / "merged")
    assert len(pd.read_csv(out / "results.csv")) == 6
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| backbone | px | AUROC m2p | AUROC p2m | AUROC mean |")
    # lite0 at the protocol's 160 px: seed mean 0.75 and 0.60 → 0.675; 200 images in 2 + 4 s → 30 ms/image;
    # 0.37 GFLOP, the 371 MFLOP that deploy_speed counts for the Lite0 backbone at 160 px (CGAD README)
    assert table[2] == (
        "| tf_efficientnet_lite0 | 160 | 0.750 ± 0.071 | 0.600 ± 0.000 | 0.675 | 0.850 ± 0.071 | 0.700 ± 0.000 "
        "| 30 | 1000 | 0.37 |"
    )
    assert table[3].startswith("| tf_efficientnet_lite2 | 256 | 0.900 | 0.500 | 0.700 |")
    assert "small" in (out / "summary.md").read_text()
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        merge([a, b], out)


def test_merge_with_several_models_adds_model_and_train_columns(tmp_path) -> None:
    nan = float("nan")
    run = _run(
        tmp_path / "run",
        {
            "cgad_small": {"model": "CGAD", "image_size": 96, "args": {"backbone": "tf_efficientnet_lite0"}},
            "knn_small": {"model": "PatchKNN", "image_size": 96, "args": {"backbone": "tf_efficientnet_lite0"}},
        },
        [("gen", "cgad_small", 4, 0, "dots", "ok", 0.90, nan), ("gen", "cgad_small", 4, 1, "dots", "ok", 0.80, nan),
         ("gen", "knn_small", 4, 0, "dots", "ok", 0.60, nan), ("gen", "knn_small", 4, 1, "dots", "ok", 0.70, nan)],
        [("gen", "cgad_small", 12.4, 100, 50.0, 900), ("gen", "knn_small", 0.0, 100, 100.0, 800)],
    )  # fmt: skip
    table = (merge([run], tmp_path / "merged") / "table.md").read_text().splitlines()
    # generated data has no clear/subtle split: no clear column; CGAD was trained: a train column
    assert table[0] == (
        "| model | backbone | px | AUROC gen | AUROC mean | train s | test ms / image | peak RSS MB "
        "| backbone GFLOP / image |"
    )
    assert table[2].startswith("| CGAD | tf_efficientnet_lite0 | 96 | 0.850 ± 0.071 | 0.850 | 12 | 20 | 900 |")
    assert table[3].startswith("| PatchKNN | tf_efficientnet_lite0 | 96 | 0.650 ± 0.071 | 0.650 | 0 | 10 | 800 |")

"""The generated MVTecAD-format datasets: layout, masks, determinism, distinct classes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from anomalib.data.datasets import MVTecADDataset
from PIL import Image

from anomalib_cgad.data import make_synthetic_mvtec


def _digest(root: Path) -> str:
    hasher = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.png")):
        hasher.update(str(path.relative_to(root)).encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"categories": ("stripes", "washer"), "n_train": 3, "n_test_good": 2, "n_test_bad": 3, "image_size": 32}
    a = make_synthetic_mvtec(tmp_path / "a", seed=1, **kwargs)
    b = make_synthetic_mvtec(tmp_path / "b", seed=1, **kwargs)
    c = make_synthetic_mvtec(tmp_path / "c", seed=2, **kwargs)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_loads_in_anomalib_with_matching_masks(synthetic_root: Path) -> None:
    train = MVTecADDataset(root=synthetic_root, category="dots", split="train")
    test = MVTecADDataset(root=synthetic_root, category="dots", split="test")
    assert len(train) == 12
    assert (train.samples.label_index == 0).all()
    assert sorted(test.samples.label_index.value_counts().to_dict().items()) == [(0, 6), (1, 6)]
    for i in range(len(test)):
        item = test[i]
        defect_pixels = int(item.gt_mask.sum())
        assert (defect_pixels > 20) == bool(item.gt_label), item.image_path


def test_defects_are_where_the_masks_say(synthetic_root: Path) -> None:
    """Pixels inside a mask differ from the class's normal look far more than pixels outside."""
    image = np.asarray(Image.open(synthetic_root / "checker" / "test" / "blob" / "000.png"), dtype=float)
    mask = np.asarray(Image.open(synthetic_root / "checker" / "ground_truth" / "blob" / "000_mask.png")) > 127
    assert mask.any()
    assert image[mask].mean() < 40  # dark blob
    assert image[~mask].mean() > 80


def test_classes_look_different(synthetic_root: Path) -> None:
    means = {
        c: np.asarray(Image.open(synthetic_root / c / "train" / "good" / "000.png"), dtype=float).mean((0, 1))
        for c in ("stripes", "dots", "checker", "waves")
    }
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 20, (a, b)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown synthetic categories"):
        make_synthetic_mvtec(tmp_path, categories=("nope",))
    (tmp_path / "stripes").mkdir()
    (tmp_path / "stripes" / "user_file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="choose an empty root"):
        make_synthetic_mvtec(tmp_path, categories=("stripes",))
    assert (tmp_path / "stripes" / "user_file.txt").read_text() == "keep me"


def test_faint_defects_change_only_the_masked_pixels_and_only_part_of_the_way(tmp_path: Path) -> None:
    """``defect_strength`` (the ``synthetic_loco`` benchmark's harder data): same images and masks, fainter defects."""
    kwargs = {"categories": ("checker",), "n_train": 2, "n_test_good": 1, "n_test_bad": 3, "image_size": 48, "seed": 3}
    full = make_synthetic_mvtec(tmp_path / "full", **kwargs)
    assert _digest(make_synthetic_mvtec(tmp_path / "one", defect_strength=1.0, **kwargs)) == _digest(full)
    faint = make_synthetic_mvtec(tmp_path / "faint", defect_strength=0.2, **kwargs)
    for part in ("train/good/000.png", "test/good/000.png", "ground_truth/blob/000_mask.png"):
        assert (full / "checker" / part).read_bytes() == (faint / "checker" / part).read_bytes(), part

    def read(root: Path) -> np.ndarray:
        return np.asarray(Image.open(root / "checker" / "test" / "blob" / "000.png"), dtype=float)

    mask = np.asarray(Image.open(full / "checker" / "ground_truth" / "blob" / "000_mask.png")) > 127
    strong, weak = read(full), read(faint)
    assert np.array_equal(strong[~mask], weak[~mask])  # outside the defect: the same normal pixels
    # inside, the faint blob is 0.8 x the normal pixels + 0.2 x the dark blob: far brighter than the full one
    assert strong[mask].mean() < 40
    assert weak[mask].mean() > 60
    with pytest.raises(ValueError, match=r"defect_strength must lie in \(0, 1\], got 0"):
        make_synthetic_mvtec(tmp_path / "zero", defect_strength=0, **kwargs)


def _colour_and_grain(name: str) -> tuple[np.ndarray, float]:
    """Mean colour (0-255) and mean absolute pixel gradient of three drawings of a class: phase-free statistics."""
    from anomalib_cgad.data.synthetic import appearance

    images = [appearance(name)(np.random.default_rng(i), 64) for i in range(3)]
    colour = np.mean([image.mean((0, 1)) for image in images], 0) * 255
    grain = np.mean([np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean() for image in images])
    return colour, float(grain)


@pytest.mark.parametrize("family", ["stripes", "washer"])
def test_numbered_variants_are_distinct_classes_of_their_family(family: str, tmp_path: Path) -> None:
    """``<family>_<n>``: another tint (n mod 6) or a coarser scale (n // 6); 18 versions of a family, none alike."""
    from anomalib_cgad.data.synthetic import APPEARANCES, TINTS, VARIANTS

    names = [family, *(f"{family}_{n}" for n in range(1, VARIANTS + 1))]
    stats = [_colour_and_grain(name) for name in names]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if i % len(TINTS) != j % len(TINTS):
                assert np.abs(stats[i][0] - stats[j][0]).max() > 15, (names[i], names[j])
            else:  # same tint, another zoom
                ratio = stats[i][1] / stats[j][1]
                assert max(ratio, 1 / ratio) > 1.2, (names[i], names[j], ratio)
    root = make_synthetic_mvtec(tmp_path, categories=(f"{family}_7",), n_train=2, n_test_good=1, n_test_bad=1)
    assert len(MVTecADDataset(root=root, category=f"{family}_7", split="test")) == 2
    assert family in APPEARANCES and f"{family}_7" not in APPEARANCES  # variants are drawn, not registered
    for bad in (f"{family}_0", f"{family}_{VARIANTS + 1}", "nope_3", f"{family}_x"):
        with pytest.raises(ValueError, match="Unknown synthetic categories"):
            make_synthetic_mvtec(tmp_path / "bad", categories=(bad,))
    assert not (tmp_path / "bad").exists()

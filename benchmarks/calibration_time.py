"""Calibration time of the normal-only operating point: features encoded once against images re-encoded per draw.

The calibration (:func:`anomalib_cgad.components.operating_point.normalised_normal_scores`) scores each source
class's held-out normal images against many reference draws, after each draw's leave-one-out pass over its k
references. It runs at every validation while fitting. Two ways of doing the same arithmetic are timed here on
the same model and images, in one run:

- ``per_draw``: every draw and every leave-one-out pass sends its images through the frozen backbone again
  (image-level ``compute_bank`` / ``forward_with_bank``, the calibration before this benchmark was written);
- ``cached``: the shipped calibration: each image is encoded once (``features``), then every draw works on
  the features (``bank_from_features`` / ``score_features``).

Both return the pooled normalised scores; ``max_abs_diff`` says they agree (the backbone is frozen and in eval
mode, so an image's features do not depend on its batch). The models use the offline ImageNet weights of the
default backbone and their untrained heads (the weights do not change the cost). Results go to a new
``<out>/calibration_time/v<N>/`` (``results.csv``, ``results.md``).

Example:
    $ python -m benchmarks.calibration_time --models CGAD ResAD MetaAD --image-size 256 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anomalib_cgad.components.operating_point import CALIBRATION_NORMALS, normalised_normal_scores
from anomalib_cgad.deploy.inferencer import leave_one_out_sets, reference_statistics
from benchmarks.config import build_module


@torch.no_grad()
def per_draw_scores(model, normals: dict, k: int, transform, draws: int, seed: int = 0) -> np.ndarray:
    """The calibration with images as the unit: the same draws as the shipped one, every image re-encoded."""
    generator = torch.Generator().manual_seed(seed)
    per_class = max(4, -(-draws // len(normals)))
    pooled = []
    for images in normals.values():
        for _ in range(per_class):
            order = torch.randperm(len(images), generator=generator)
            refs, held_out = images[order[:k]], images[order[k:]]
            scores, maps = [], []
            for held, others in leave_one_out_sets(k):
                bank = model.compute_bank(
                    transform(refs[others] if others is not None else refs[held : held + 1].flip(-1))
                )
                output = model.forward_with_bank(transform(refs[held : held + 1]), bank)
                scores.append(float(output.pred_score.reshape(-1)[0]))
                maps.append(output.anomaly_map.float().cpu().numpy())
            location, scale = reference_statistics(scores, maps).tolist()
            bank = model.compute_bank(transform(refs))
            for start in range(0, len(held_out), 32):
                raw = model.forward_with_bank(transform(held_out[start : start + 32]), bank).pred_score
                pooled.append((raw.float().cpu().numpy() - location) / scale)
    return np.concatenate(pooled)


def _model(name: str, image_size: int):
    from anomalib.models import get_model

    module = build_module(type(get_model(name)), (image_size, image_size))
    return module.model.eval(), module.pre_processor.transform


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark; return the results folder."""
    from anomalib_cgad.versioning import next_version_folder

    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration_time", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["CGAD", "ResAD", "MetaAD"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=4, help="references per draw")
    parser.add_argument("--draws", type=int, default=8, help="reference draws (the shipped calibration makes 32)")
    parser.add_argument("--normals", type=int, default=CALIBRATION_NORMALS, help="normal images of the one class")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--out", default="results", help="results root; the run goes to <out>/calibration_time/v<N>")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = {
        "class": torch.rand(
            args.normals, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
        )
    }
    rows = []
    for name in args.models:
        model, transform = _model(name, args.image_size)
        timings, results = {}, {}
        for way, run in (("per_draw", per_draw_scores), ("cached", normalised_normal_scores)):
            wall, cpu = time.perf_counter(), time.process_time()
            results[way] = run(model, images, args.k, transform, draws=args.draws)
            timings[way] = (time.perf_counter() - wall, time.process_time() - cpu)
        rows.append({
            "model": name, "image_size": args.image_size, "k": args.k, "draws": args.draws, "normals": args.normals,
            "per_draw_wall_s": round(timings["per_draw"][0], 1), "per_draw_cpu_s": round(timings["per_draw"][1], 1),
            "cached_wall_s": round(timings["cached"][0], 1), "cached_cpu_s": round(timings["cached"][1], 1),
            "cpu_speedup": round(timings["per_draw"][1] / timings["cached"][1], 2),
            "max_abs_diff": float(np.abs(results["per_draw"] - results["cached"]).max()),
            "scores": len(results["cached"]),
        })  # fmt: skip
        print(rows[-1])
    folder = next_version_folder(Path(args.out) / "calibration_time")
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "results.csv", index=False)
    machine = f"{platform.processor() or platform.machine()}, torch threads {args.threads}"
    (folder / "results.md").write_text(
        f"# Operating point calibration time ({machine})\n\n"
        "Same draws, same pooled normalised scores; `per_draw` re-encodes every image at every draw, `cached` "
        "(shipped) encodes each image once.\n\n" + frame.to_markdown(index=False) + "\n"
    )
    print(f"results in {folder}")
    return folder


if __name__ == "__main__":  # pragma: no cover
    main()

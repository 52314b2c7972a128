"""What a test pass observes: per-image raw scores, labels, maps and timing (:class:`ScoreCollector`), and memory.

:func:`benchmarks.results.rows_from_collector` turns a finished collector into result rows.
"""

from __future__ import annotations

import threading
import time

import torch
from lightning.pytorch import Callback

from benchmarks.metrics import normal_only_offsets

OVERLAYS_PER_CLASS = 3


class ScoreCollector(Callback):
    """Collect raw per-image scores, labels, paths and (with masks) anomaly maps during ``trainer.test``.

    It is a trainer callback, so Lightning runs it before the model's post-processor: scores are the model's
    raw ones (no clamping) and the transferred label is ``raw score > post_processor.image_threshold``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Forget what was collected."""
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.paths: list[str] = []
        self.maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.examples: dict[str, torch.Tensor] = {}
        self.threshold = float("nan")
        self.normal_only: dict[float, float] | None = None  # requested rate -> threshold on the collected scores
        self.seconds = 0.0
        self.bank_refs: int | None = None
        self._start = 0.0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        """Start the clock and read the transferred (source-validation) threshold."""
        del trainer
        self.threshold = float(pl_module.post_processor.image_threshold)
        if hasattr(pl_module, "operating_point") and pl_module.operating_point.calibrated:
            self.normal_only = normal_only_offsets(pl_module)
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Store the batch's raw scores (and maps where ground-truth masks exist)."""
        del trainer, pl_module, outputs, batch_idx, dataloader_idx
        self.scores.append(batch.pred_score.detach().float().reshape(-1).cpu())
        self.labels.append(batch.gt_label.detach().int().reshape(-1).cpu())
        self.paths.extend(str(p) for p in batch.image_path)
        maps = batch.anomaly_map
        masks = batch.gt_mask
        if maps is not None and masks is not None and masks.numel():
            self.maps.append(maps.detach().float().reshape(len(batch.image_path), *maps.shape[-2:]).cpu().half())
            self.masks.append(masks.detach().reshape(len(batch.image_path), *masks.shape[-2:]).cpu().bool())
        if maps is not None:
            for path, label, amap in zip(batch.image_path, batch.gt_label, maps, strict=False):
                key = f"{int(label)}::{path}"
                if sum(k.startswith(f"{int(label)}::") for k in self.examples) < OVERLAYS_PER_CLASS:
                    self.examples[key] = amap.detach().float().reshape(*amap.shape[-2:]).cpu()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        """Stop the clock and note how many references the model's bank holds."""
        del trainer
        self.seconds = time.perf_counter() - self._start
        bank = getattr(getattr(pl_module, "model", None), "bank", None)
        if bank is not None and hasattr(bank, "num_refs"):
            self.bank_refs = int(bank.num_refs)


class MemoryMonitor:
    """Peak resident memory (CPU, sampled by a thread) and peak CUDA memory during a block."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMonitor:
        import psutil

        process = psutil.Process()
        self.peak_rss = process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_cuda(self) -> int | None:
        """Peak CUDA memory allocated by torch in bytes (``None`` without a GPU)."""
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None

"""Lightning's own multi-device strategies on our models: ``--trainer.devices N --trainer.strategy ddp``.

Two things stop a plain DDP run of ResAD, MetaAD and CGAD, and the models fix both themselves:

1. **Unused parameters.** The models optimise manually, several backward passes per step (MetaAD and CGAD:
   one per inner class of an episode, then the outer level; ResAD: codebook, constraintor, flow chunks), and each
   pass reaches only part of the parameters. DDP with ``find_unused_parameters=False`` (what ``ddp`` means) then
   stops with "parameters that were not used in producing the loss". :func:`prepare_ddp` (called from the models'
   ``setup``, before Lightning wraps the module) switches it on for any DDP strategy.
2. **Samplers.** Every evaluation batch of :class:`~anomalib_cgad.data.CrossClass` holds one class (the bank
   switches per class), through a batch sampler Lightning cannot shard (``TypeError: Lightning can't inject a
   (distributed) sampler``). The models' ``trainer_arguments`` therefore set ``use_distributed_sampler=False``.

So every process runs the same batches and the same episodes (an episode's inner/outer split decides how many
backward passes a step makes, and all ranks must make the same number) and DDP averages their gradients. The
result is a model like a one-process run's, not a bit-identical one (nor are two one-process runs under DDP):
pixel AUROC 0.9843-0.9903 over four two-process runs of the CPU test, 0.9855-0.9886 over five one-process
runs, image AUROC 1.0 in all; ``tests/integration/test_ddp.py`` requires AUROC within 0.01 of a one-process run.
The reference bank is computed on every rank from the same references; rank 0 writes the checkpoint
(Lightning). A second device therefore does not make one training faster: spread *runs* over devices instead
(one benchmark task per device, ``benchmarks/README.md``).
"""

from __future__ import annotations

import logging

from lightning.pytorch.strategies import DDPStrategy

logger = logging.getLogger(__name__)


def prepare_ddp(module) -> bool:
    """Enable ``find_unused_parameters`` on the trainer's DDP strategy before it wraps ``module``.

    Returns:
        bool: whether the strategy was changed.
    """
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DDPStrategy):  # also one process: DDP's reducer sees the same partial backward
        return False
    # Lightning keeps the DistributedDataParallel arguments in ``_ddp_kwargs`` until ``strategy.setup`` wraps the
    # module, which runs after the LightningModule's ``setup``; there is no public setter.
    kwargs = strategy._ddp_kwargs
    if kwargs.get("find_unused_parameters"):
        return False
    kwargs["find_unused_parameters"] = True
    logger.info(
        "%s under DDP (%d processes): find_unused_parameters=True (each manual backward pass reaches part of the "
        "parameters); every process runs the same batches and episodes.",
        type(module).__name__,
        strategy.world_size,
    )
    return True

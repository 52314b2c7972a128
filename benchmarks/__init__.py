"""Cross-class benchmarks of anomalib-cgad against anomalib's own models (``python -m benchmarks run ...``).

See ``benchmarks/README.md`` for the presets, the columns of the results and the accelerator behaviour.
"""

"""Post-training crossbar evaluation: a checkpoint scored on the crossbar over a sweep of hardware
fields, bits and device noise (`python -m lib.crossbar_eval`, docs/crossbar-eval.md)."""

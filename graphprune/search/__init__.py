"""Driving the pipeline many times: budget targets and sweeps (``targets``), iterative pruning
(``pruner``) and per-group sensitivity tables (``sensitivity``)."""

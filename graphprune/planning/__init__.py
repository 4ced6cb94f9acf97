"""Stage 2, deciding what to remove: score each group's units (``importance``, with calibration
data in ``calibration``), choose how many to cut where (``cut``), and record the result as a
versioned, JSON-serialisable ``Plan`` (``plan``)."""

"""Accuracy without retraining: calibrated unit selection and least-squares reconstruction.

``compact(model, x, ratio, data=calib, reconstruct=True)`` runs, after planning and before
surgery:

* ``moments``  -- the one accumulator of calibration statistics (sums + counts, all-reducible);
* ``consumers`` -- which layers read a group's units and how their input columns are read;
* ``select``   -- greedy structured OBS selection and the ridge refit it implies;
* ``run``      -- the sequential pass over groups in graph order on the compacted prefix;
* ``norms``    -- BatchNorm statistics re-estimated afterwards;
* ``biases``   -- zero biases for layers without one, kept only where compensation used them;
* ``hook``     -- the thin entry point used by ``graphprune.api``.
"""

from graphprune.reconstruct.moments import Moments, SecondMoments
from graphprune.reconstruct.run import Reconstruction, ReconstructOptions

__all__ = ["Moments", "ReconstructOptions", "Reconstruction", "SecondMoments"]

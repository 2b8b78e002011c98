"""Sizing the prefill and decode pools from SLOs and measured traffic.

``profile`` fits what one worker of each pool does from a measured run of
the batch-eval driver; ``traffic`` reads the rate and lengths a running
router finishes off its metrics; ``sizing`` turns a profile, a traffic and
SLOs into the fewest workers per pool, a deployment's predicted TTFT and
TPOT, or the highest rate it serves. ``tools/plan_pools.py`` is the
command line. ``control`` acts on it: a loop that measures a router's live
traffic, predicts the next interval and resizes the pools through a
``scaler`` (local processes, Kubernetes workloads), moving workers of both
pools first (``python -m pdjax.launch.planner``).
"""

from pdjax.planner.profile import (DecodeModel, PrefillModel, Profile,
                                   ProfileError, fit_profile)
from pdjax.planner.sizing import (Batching, Prediction, Slo, Traffic,
                                  capacity, plan, predict)

__all__ = ["Batching", "DecodeModel", "PrefillModel", "Prediction", "Profile",
           "ProfileError", "Slo", "Traffic", "capacity", "fit_profile",
           "plan", "predict"]

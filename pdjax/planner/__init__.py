"""Sizing the prefill and decode pools from SLOs and measured traffic.

``profile`` fits what one worker of each pool does from a measured run of
the batch-eval driver; ``sizing`` turns that, a traffic (rate and lengths)
and SLOs into the fewest workers per pool, a deployment's predicted TTFT
and TPOT, or the highest rate it serves. ``tools/plan_pools.py`` is the
command line. It is offline today; the router's metrics carry the same
quantities (prefill time, TTFT, rows per decode worker), which is where a
planner that resizes a running deployment will read them.
"""

from pdjax.planner.profile import (DecodeModel, PrefillModel, Profile,
                                   ProfileError, fit_profile)
from pdjax.planner.sizing import (Batching, Prediction, Slo, Traffic,
                                  capacity, plan, predict)

__all__ = ["Batching", "DecodeModel", "PrefillModel", "Prediction", "Profile",
           "ProfileError", "Slo", "Traffic", "capacity", "fit_profile",
           "plan", "predict"]

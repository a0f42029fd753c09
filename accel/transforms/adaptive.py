"""Run-time cache decisions for UNets: recompute when a free probe says the deep feature has drifted.

First-Block-Cache, TeaCache and MagCache decide per step, for DiTs, whether to run the whole model
(PAPERS.md, "Run-time caches and forecasting"). In a UNet the probe is free: ``conv_in`` runs on every call,
cached or not, before any module the cache skips. :class:`Probe` hooks it and, at a call the schedule leaves
open, compares its output ``p_t`` with what the cache would assume about it: the value at the last full call
(reuse), or the forecast from the last full calls with the same weights the cache uses for the deep feature
(:mod:`accel.transforms.forecast`):

    e_t = max over samples of  mean|p_t - sum_m w_m(t) p_{x_m}| / mean|p_t|

(relative L1, per sample; the batch runs the full UNet if any sample needs it). With reuse this is
First-Block-Cache's relative change since the last full call; with a forecast it measures how far the
trajectory has left the polynomial the forecast extrapolates, which is when a forecast stops being trusted.
``e_t > threshold`` makes the call full; so does ``max_cached`` consecutive cached calls (MagCache's cap).
``accel calibrate`` finds the threshold that spends a given mean number of full calls on the calibration
prompts (:func:`accel.calibrate.calibrate_threshold`), so a user asks for a budget.

Reading ``e_t`` is the one deliberate host sync per UNet call of this mode (a decision on the host needs a
host value); fixed schedules have none.
"""
from __future__ import annotations

import torch
from diffusers.hooks import ModelHook


def relative_error(p: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``max_b mean|p_b - pred_b| / mean|p_b|`` over the batch (a 0-dim device tensor)."""
    num = (p - pred).abs().flatten(1).mean(1)
    den = p.abs().flatten(1).mean(1).clamp_min(1e-12)
    return (num / den).max()


class Probe(ModelHook):
    """On ``conv_in``: lets its owner (a :class:`~accel.transforms.cache.FeatureCache`) decide the call from the
    probe feature, before any cached module runs."""

    _is_stateful = True

    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def post_forward(self, module, output):
        self.owner._decide(output)
        return output

    def reset_state(self, module):
        return module

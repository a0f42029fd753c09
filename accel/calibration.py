"""The calibration artifact: a folder with ``accel.json`` and ``calibration.safetensors``.

``accel.json`` says what the numbers are for (recipe, accel/diffusers/torch versions, model fingerprint,
scheduler class and UNet calls per pipeline call, prompt source, seeds) and carries the SHA-256 of the
tensor file. Loading uses JSON and safetensors only (never pickle) and raises :class:`CalibrationError`
with what to do on a missing, truncated or corrupted file, NaN/inf values, another model, another
scheduler, or another step count. Writing is atomic: a temporary folder renamed into place; an existing folder is
replaced only if it is a calibration (anything else is refused before any work: :func:`check_destination`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from . import schedules
from .adapters import fingerprint, tensor_sample  # noqa: F401  (the model identity a calibration records)
from .errors import AccelWarning, CalibrationError
from .transforms.dec import CacheDEC, Moments, coefficient, coefficients

FORMAT = "accel-calibration"
VERSION = 3  # 2: asymmetric activation quantizers (quant.scale_sym / scale_asym / shift); 3: refined cache schedules (cache.bB.refined.K)
META_FILE = "accel.json"
TENSOR_FILE = "calibration.safetensors"


# ----------------------------------------------------------------------------------- the tensor keys
# This module owns the names of the tensors in ``calibration.safetensors``: ``accel calibrate`` writes them through
# these functions and the accessors below read them through the same ones.
def cache_key(branch: int, what: str) -> str:
    """A cache statistic of ``branch``: ``distance`` (N, N), ``mean`` / ``sq`` / ``cross`` (the DEC moments),
    ``schedule``, ``dec_a`` / ``dec_b``."""
    return f"cache.b{branch}.{what}"


def quant_key(what: str, path: str) -> str:
    """A quantization tensor of the layer at ``path``: ``scale_sym``, ``scale_asym``, ``scale_sym_mse``,
    ``scale_asym_mse``, ``shift`` (per call and input part), ``dec_alpha`` / ``dec_beta`` (per call and channel)."""
    return f"quant.{what}.{path}"


def quant_layers(tensors, what: str = "shift") -> list[str]:
    """The layer paths with a ``what`` quantization tensor, sorted."""
    pre = f"quant.{what}."
    return sorted(k[len(pre):] for k in tensors if k.startswith(pre))


def inherit_key(path: str) -> str:
    """The pairwise distance matrix of the inheritance target at ``path``."""
    return f"inherit.{path}.distance"


def refined_name(budget: int, forecast: str | None = None) -> str:
    """How ``accel.json`` names the schedule refined for ``budget`` full calls with this forecast."""
    return str(budget) if forecast is None else f"{forecast}.{budget}"


def refined_key(branch: int, budget: int, forecast: str | None = None) -> str:
    """Where a calibration keeps the schedule refined for ``budget`` full calls (with this forecast: the
    refinement measures the final samples with the cache as it will run)."""
    return cache_key(branch, f"refined.{refined_name(budget, forecast)}")


def dscale_key(branch: int, budget: int, forecast: str | None) -> str:
    """Where a calibration keeps the guidance-difference norm model ``W`` (calls, C, 3) fit for the schedule it serves
    for ``budget`` full calls with this forecast (:func:`refined_key`'s, or the DP's when it was not refined)."""
    return cache_key(branch, f"dscale.{refined_name(budget, forecast)}")


def is_calibration_folder(path: Path) -> bool:
    """A folder holding only what :meth:`Calibration.save` writes, with an ``accel.json`` of this format."""
    try:
        names = {p.name for p in Path(path).iterdir()}
        if META_FILE not in names or not names <= {META_FILE, TENSOR_FILE}:
            return False
        return json.loads((Path(path) / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(path: str | os.PathLike, flag: str = "") -> Path:
    """Where :meth:`Calibration.save` may write: a new folder, an empty one, or a calibration (replaced);
    anything else raises a one-line error before any work."""
    from .fileio import check_destination as check

    return check(path, is_calibration_folder, "an accel calibration folder", folder=True, flag=flag)


def uses_calibration(transform) -> bool:
    """Whether ``transform`` reads a calibration when one is given (what ``accel calibrate`` is for)."""
    from .transforms import FeatureCache, Inherit, Quantize

    if isinstance(transform, FeatureCache):
        return transform.schedule in ("calibrated", "dp") or transform.correction is not None or \
            (transform.schedule == "adaptive" and transform.threshold is None)
    if isinstance(transform, Quantize):
        return transform.mode != "dynamic"
    if isinstance(transform, Inherit):
        return transform.schedule == "calibrated"
    return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CacheCalibration:
    """The cache part of a calibration for one branch: distances (DP schedule) and moments (DEC)."""

    def __init__(self, calib: "Calibration", branch: int, budget: int | None = None):
        if cache_key(branch, "distance") not in calib.tensors:
            have = sorted({k.split(".")[1] for k in calib.tensors if k.startswith("cache.")})
            raise CalibrationError(f"the calibration has no cache statistics for branch {branch} "
                                   f"(it has: {', '.join(have) or 'none'}); recalibrate with --branch {branch}")
        self.calib, self.branch = calib, branch
        self.distance = calib.tensors[cache_key(branch, "distance")].double()
        self.moments = Moments(*(calib.tensors[cache_key(branch, w)].double() for w in ("mean", "sq", "cross")))
        self.n = self.distance.shape[0]
        cache_meta = calib.meta.get("cache", {})
        if budget is not None:
            schedules.check_budget(budget, self.n, "cache budget", "", CalibrationError,
                                   f": this calibration has {self.n} UNet calls per pipeline call")
        self.budget = budget if budget is not None else cache_meta.get("budget")
        self.constrained = cache_meta.get("constrained", True)

    def check_calls(self, n: int | None):
        self.calib.check_calls(self.n, n)

    def full_calls(self, n: int | None = None, budget: int | None = None, forecast: str | None = None) -> list[int]:
        """The calibrated schedule for ``budget`` full calls (default: the calibrated budget): the refined one
        if ``accel calibrate`` refined this budget with this forecast (see :func:`accel.calibrate.refine_schedule`),
        else the DP's."""
        self.check_calls(n)
        k = self._budget(budget)
        refined = self.calib.tensors.get(refined_key(self.branch, k, forecast))
        if refined is not None:
            return schedules.validate(refined.tolist(), self.n)
        return self.dp_calls(k)

    def refined_budgets(self, forecast: str | None = None) -> list[int]:
        pre = cache_key(self.branch, "refined.") + ("" if forecast is None else f"{forecast}.")
        return sorted(int(k[len(pre):]) for k in self.calib.tensors if k.startswith(pre) and k[len(pre):].isdigit())

    def dscale(self, budget: int | None = None, forecast: str | None = None) -> torch.Tensor:
        """The guidance-difference norm model ``W`` (UNet calls, channels, 3; float32; rows of full calls 0) fit for
        :meth:`full_calls` at ``budget`` with this ``-cfg`` forecast (:mod:`accel.transforms.forecast`)."""
        k = self._budget(budget)
        w = self.calib.tensors.get(dscale_key(self.branch, k, forecast))
        if w is None:
            pre = cache_key(self.branch, "dscale.")
            have = sorted(key[len(pre):] for key in self.calib.tensors if key.startswith(pre))
            raise CalibrationError(
                f"the calibration has no guidance-difference model for budget {k} with forecast={forecast} (it has: "
                f"{', '.join(have) or 'none'}); calibrate with a recipe holding FeatureCache(schedule='calibrated', "
                f"forecast={forecast!r}, difference='calibrated') and --budget {k}")
        return w.float()

    def _budget(self, budget: int | None) -> int:
        k = budget if budget is not None else self.budget
        if k is None:
            raise CalibrationError("no budget: give FeatureCache(budget=K) or calibrate with --budget K")
        return schedules.check_budget(k, self.n, "budget", "", CalibrationError, " (UNet calls per pipeline call)")

    def dp_calls(self, budget: int | None = None) -> list[int]:
        """The DP schedule (CacheQuant's DPS) on the calibrated feature distances, unrefined."""
        k = self._budget(budget)
        C = schedules.group_cost(D=self.distance.numpy())
        if self.constrained:
            lo, hi = schedules.paper_bounds(self.n, k)
        else:
            lo, hi = 1, self.n
        return schedules.dp_schedule(C, k, lo, hi)[0]

    def dec(self, full_calls: list[int], gain: bool = True, order: int = 0) -> CacheDEC:
        """The DEC of a fixed schedule, for every call (``order``: the forecast the correction applies to)."""
        return CacheDEC(*coefficients(self.moments, full_calls, gain, order))

    def dec_for(self, t: int, srcs: list[int], gain: bool = True):
        """The correction of one cached call ``t`` whose input is forecast from the full calls ``srcs`` (newest
        first): what an adaptive schedule needs, computed when a call is first met (then kept by the cache)."""
        a, b = coefficient(self.moments, srcs, t, gain)
        a_full = torch.ones(self.n, a.numel(), dtype=torch.float64)
        b_full = torch.zeros_like(a_full)
        a_full[t], b_full[t] = a, b
        return CacheDEC(a_full, b_full).for_call(t)

    def threshold(self, forecast: str | None, max_cached: int | None, correction: str | None,
                  budget: int | None = None) -> float:
        """The adaptive schedule's probe threshold that spent ``budget`` full calls per pipeline call on average
        over the calibration prompts, for this forecast / cap / correction (:func:`accel.calibrate.calibrate_threshold`)."""
        k = self._budget(budget)
        for entry in self.calib.meta.get("cache", {}).get("adaptive", []):
            if (entry["forecast"], entry["max_cached"], entry["correction"]) == (forecast, max_cached, correction) \
                    and str(k) in entry["thresholds"]:
                return float(entry["thresholds"][str(k)])
        have = [f"budget {b} (forecast={e['forecast']}, max_cached={e['max_cached']}, correction={e['correction']})"
                for e in self.calib.meta.get("cache", {}).get("adaptive", []) for b in e["thresholds"]]
        raise CalibrationError(f"the calibration has no adaptive threshold for budget {k} with forecast={forecast}, "
                               f"max_cached={max_cached}, correction={correction} (it has: {', '.join(have) or 'none'}); "
                               "calibrate with a recipe holding this FeatureCache(schedule='adaptive') and --budget "
                               f"{k}, or give threshold=x")


class QuantCalibration:
    """The quantization part: per-layer, per-call activation scales and the quantization DEC."""

    def __init__(self, calib: "Calibration"):
        self.calib = calib

    def scales(self, path: str, parts: int, asymmetric: bool = True,
               clip: str = "range") -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scales, shifts)`` per call and input part for a layer; the calibration holds every scheme."""
        kind = ("asym" if asymmetric else "sym") + ("_mse" if clip == "mse" else "")
        t = self.calib.tensors.get(quant_key(f"scale_{kind}", path))
        if t is None or t.shape[1] != parts:
            raise CalibrationError(f"the calibration has no {kind} activation scales for layer {path!r}: it "
                                   "was made for another model or quantization setting; recalibrate")
        shift = self.calib.tensors[quant_key("shift", path)].float() if asymmetric else None
        return t.float(), shift

    def dec(self, path: str):
        a = self.calib.tensors.get(quant_key("dec_alpha", path))
        return None if a is None else (a.float(), self.calib.tensors[quant_key("dec_beta", path)].float())


class Calibration:
    """A loaded (or freshly computed) calibration: ``meta`` (the JSON) and ``tensors`` (name -> tensor)."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor]):
        self.meta, self.tensors = meta, tensors

    def cache(self, branch: int, budget: int | None = None) -> CacheCalibration:
        return CacheCalibration(self, branch, budget)

    def inherit_schedule(self, paths: list[str], n: int | None, residual: bool = False,
                         budget: int | None = None) -> list[int]:
        """The calls at which ``Inherit(schedule="calibrated")`` runs its targets ``paths``: the DP schedule on
        the sum of the targets' distance matrices, each scaled to mean 1 (so every target counts alike)."""
        meta = self.meta.get("inherit")
        missing = [p for p in paths if inherit_key(p) not in self.tensors]
        if meta is None or missing:
            raise CalibrationError(f"the calibration has no inheritance statistics for {missing or paths}; "
                                   "recalibrate with the recipe that holds this Inherit")
        if bool(meta.get("residual")) != bool(residual):
            raise CalibrationError(f"the calibration measured the targets' {'residuals' if meta.get('residual') else 'outputs'}"
                                   f", this Inherit inherits {'residuals' if residual else 'outputs'}; recalibrate")
        dists = [self.tensors[inherit_key(p)].double() for p in paths]
        D = sum(d / d.mean().clamp_min(1e-30) for d in dists)
        N = D.shape[0]
        self.check_calls(N, n)
        k = budget if budget is not None else meta.get("budget")
        schedules.check_budget(k, N, "Inherit budget", "", CalibrationError)
        lo, hi = schedules.paper_bounds(N, k)
        return schedules.dp_schedule(schedules.group_cost(D=D.numpy()), k, lo, hi)[0]

    def check_calls(self, calibrated: int, n: int | None):
        """A clear error when a pipeline call makes ``n`` UNet calls and the calibration holds ``calibrated``."""
        if n is not None and n != calibrated:
            sched = self.meta.get("scheduler", {})
            raise CalibrationError(
                f"this calibration was made for {calibrated} UNet calls per pipeline call ({sched.get('steps')} steps "
                f"of {sched.get('class')}) but this call makes {n}: recalibrate with `accel calibrate --steps ...` "
                "for this step count")

    def check_guidance(self, guidance: float | None):
        """Compare the guidance scale of a pipeline call with the calibration's: classifier-free guidance on in
        one and off in the other (scale <= 1: the UNet batch halves, the statistics are of another batch) is a
        :class:`CalibrationError`; another scale with guidance on in both, a warning (the statistics depend on it)."""
        made = self.meta.get("generation", {}).get("guidance")
        if guidance is None or made is None or float(guidance) == float(made):
            return
        cfg_made, cfg_now = made > 1, guidance > 1
        if cfg_made != cfg_now:
            raise CalibrationError(
                f"this calibration was made at guidance {made} (classifier-free guidance {'on' if cfg_made else 'off'}), "
                f"this run uses {guidance} (guidance {'on' if cfg_now else 'off'}: the UNet batch "
                f"{'doubles' if cfg_now else 'halves'}); recalibrate with `accel calibrate --guidance {guidance}`")
        warnings.warn(f"this calibration was made at guidance {made}, this run uses {guidance}: its statistics depend "
                      f"on the scale; for the best schedule recalibrate with --guidance {guidance}", AccelWarning,
                      stacklevel=2)

    def quant(self) -> QuantCalibration | None:
        """The quantization statistics, or None if this calibration has none."""
        return QuantCalibration(self) if any(k.startswith("quant.scale_") for k in self.tensors) else None

    # -- writing -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: everything goes to a temporary folder that replaces ``path`` at the end. ``path`` may
        be new, an empty folder or a calibration folder; anything else is refused (:func:`check_destination`)."""
        from safetensors.torch import save_file

        from .fileio import new_folder, umask

        path = check_destination(path)
        with new_folder(path, is_calibration_folder, "an accel calibration folder") as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp / TENSOR_FILE)
            os.chmod(tmp / TENSOR_FILE, 0o666 & ~umask())  # safetensors writes it 0600
            meta = dict(self.meta, format=FORMAT, version=VERSION)
            meta["files"] = {TENSOR_FILE: {"sha256": _sha256(tmp / TENSOR_FILE),
                                           "bytes": (tmp / TENSOR_FILE).stat().st_size}}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        self.meta = meta
        return path

    # -- reading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, unet=None, pipe=None) -> "Calibration":
        """Load and check a calibration folder (against ``unet`` / ``pipe`` when given)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta_path, tensor_path = path / META_FILE, path / TENSOR_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise CalibrationError(f"{path} is not a calibration folder (needs {META_FILE} and {TENSOR_FILE}); "
                                   "run `accel calibrate ... --out DIR`")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalibrationError(f"{meta_path} is corrupted ({e}); recalibrate") from None
        if meta.get("format") != FORMAT:
            raise CalibrationError(f"{meta_path} is not an accel calibration")
        if meta.get("version") != VERSION:
            raise CalibrationError(f"{path}: calibration format version {meta.get('version')}, this accel reads "
                                   f"{VERSION}; recalibrate")
        expected = meta.get("files", {}).get(TENSOR_FILE, {})
        size = tensor_path.stat().st_size
        if expected.get("bytes") is not None and size != expected["bytes"]:
            raise CalibrationError(f"{tensor_path} is truncated or corrupted ({size} bytes, expected "
                                   f"{expected['bytes']}); recalibrate")
        if expected.get("sha256") and _sha256(tensor_path) != expected["sha256"]:
            raise CalibrationError(f"{tensor_path} does not match its checksum in {META_FILE}: corrupted; recalibrate")
        try:
            tensors = load_file(tensor_path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CalibrationError(f"{tensor_path} cannot be read ({e}); recalibrate") from None
        for k, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CalibrationError(f"{tensor_path}: tensor {k!r} holds NaN or inf; recalibrate")
        calib = cls(meta, tensors)
        if unet is not None:
            calib.check_model(unet)
        if pipe is not None:
            calib.check_scheduler(pipe.scheduler)
        return calib

    def check_model(self, unet):
        want = self.meta.get("model", {}).get("fingerprint")
        have = fingerprint(unet)
        if want != have:
            raise CalibrationError(
                f"this calibration was made for another model (fingerprint {want}, this UNet {have}){self._fused_hint(unet)}; "
                "recalibrate for this model with `accel calibrate`")
        self.check_adapters(unet)

    def _fused_hint(self, unet) -> str:
        from . import adapters

        was = (self.meta.get("model", {}).get("adapters") or {}).get("fused", [])
        now = (adapters.record(unet) or {}).get("fused", [])
        if was == now:
            return ""
        return (f" (fused LoRA adapters change the weights: it was measured with {was or 'none'} fused, "
                f"this UNet has {now or 'none'} fused)")

    def check_adapters(self, unet):
        """Warn (:class:`accel.adapters.AdapterMismatchWarning`, one line) when the active, unfused LoRA adapters
        (and their weights) differ from those the statistics were measured with."""
        from . import adapters

        adapters.warn_mismatch(self.meta.get("model", {}).get("adapters"), unet)

    def check_scheduler(self, scheduler):
        want = self.meta.get("scheduler", {}).get("class")
        if want and type(scheduler).__name__ != want:
            raise CalibrationError(f"this calibration was made with {want}, the pipeline now uses "
                                   f"{type(scheduler).__name__}: recalibrate with this scheduler")

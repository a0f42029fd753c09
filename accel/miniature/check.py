"""The miniature's deterministic pixel checker: what a miniature-world image shows, read from its pixels alone.

It is independent of the miniature CLIP (whose judgement it cross-checks, issue #24: ``make demo`` showed images
the CLIP passed with the wrong shape or colour): it segments the foreground against the background colour, reads
the background and the shape's colour as the nearest palette colours, and fits each shape's exact outline (the
renderer's own masks, :func:`world._mask`) to the foreground by coordinate search over centre and radius; the
best-fitting outline gives the shape, its fitted centre the position and its fitted radius the size. A shape
counts as right only if its outline also covers the foreground well (IoU >= :data:`MIN_IOU`), so a pinched
square or a blob is wrong.

This module measures nothing with a model and imports nothing from ``accel.eval`` (the miniature sits below eval
in the layers, tests/test_imports.py): eval's runner uses it for its per-image verdicts, and
``python -m accel.experiments.miniature_quality`` measures it on dataset images, VAE round trips and generations.
"""
from __future__ import annotations

import numpy as np
import torch

from . import world


# ------------------------------------------------------------------------------------- pixel checker
MIN_IOU = 0.75  # the fitted outline must cover the foreground at least this well for the shape to be right
_FG_THRESHOLD = 0.15  # RGB distance (0..sqrt(3)) from the background above which a pixel is foreground
_FIT_RES = 128  # resolution the outlines are rasterised at (box-filtered to the image's) while fitting
# the outline's bounding box per shape, in units of its radius: (half width, top, bottom) about the centre
_EXTENT = {"circle": (1.0, 1.0, 1.0), "square": (0.85, 0.85, 0.85), "triangle": (1.0, 1.0, 0.8),
           "cross": (1.0, 1.0, 1.0)}


def _as_array(image) -> np.ndarray:
    """``(H, W, 3)`` float array in [0, 1] from a PIL image, a ``(3, H, W)`` tensor in [0, 1] or an array."""
    if isinstance(image, torch.Tensor):
        a = image.detach().float().cpu().numpy()
        a = np.transpose(a, (1, 2, 0)) if a.shape[0] == 3 else a
    else:
        a = np.asarray(image)
        a = a[..., :3].astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    if a.shape[:2] != (world.DEFAULT_SIZE, world.DEFAULT_SIZE):  # another model's resolution: read it at 64 px
        from PIL import Image

        img = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))
        a = np.asarray(img.resize((world.DEFAULT_SIZE,) * 2, Image.BOX)).astype(np.float32) / 255.0
    return a


def _nearest(colour: np.ndarray, palette: dict) -> tuple[str, float]:
    names = list(palette)
    d = [float(np.linalg.norm(colour - np.array(palette[n]) / 255.0)) for n in names]
    i = int(np.argmin(d))
    return names[i], d[i]


def _outline(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    m = world._mask(shape, cx, cy, r, _FIT_RES).astype(np.float32)
    f = _FIT_RES // size
    return m.reshape(size, f, size, f).mean(axis=(1, 3)) if f > 1 else m


def _iou(alpha: np.ndarray, m: np.ndarray) -> float:
    return float(np.minimum(alpha, m).sum() / max(np.maximum(alpha, m).sum(), 1e-6))


def _fit(shape: str, alpha: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, tuple]:
    """Coordinate search of (cx, cy, r) maximising the IoU of ``shape``'s outline with ``alpha``, started
    from the outline whose bounding box is ``box`` = (x0, y0, x1, y1) in fractions of the image side."""
    size = alpha.shape[0]
    hw, top, bottom = _EXTENT[shape]
    x0, y0, x1, y1 = box
    r = max((x1 - x0) / (2 * hw), (y1 - y0) / (top + bottom), 0.02)
    p = [0.5 * (x0 + x1), y0 + top * r, r]
    best = _iou(alpha, _outline(shape, *p, size))
    steps = [0.04, 0.04, 0.25 * r]
    while max(steps[0], steps[1]) > 0.25 / size:
        improved = False
        for k in range(3):
            for sign in (1, -1):
                q = list(p)
                q[k] += sign * steps[k]
                if q[2] <= 0.01:
                    continue
                v = _iou(alpha, _outline(shape, *q, size))
                if v > best + 1e-6:
                    best, p, improved = v, q, True
                    break
        if not improved:
            steps = [s / 2 for s in steps]
    return best, tuple(p)


def read(image) -> dict:
    """What a miniature-world image shows, read from its pixels alone (no model).

    Returns ``shape, colour, size, position, background`` (the grammar's options, or None where no
    foreground is found) and the measurements behind them: ``iou`` (of the best-fitting outline),
    ``ious`` (every shape's), ``centre`` (x, y), ``radius``, ``area`` (foreground fraction of the image),
    ``fill`` (foreground area / its bounding box), ``rgb`` (the shape's median colour, 0..255),
    ``colour_distance`` and ``background_distance`` (RGB distance in 0..255 units to the palette colour read).
    """
    a = _as_array(image)
    size = a.shape[0]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    background, bg_dist = _nearest(bg, world.BACKGROUNDS)
    d = np.linalg.norm(a - bg, axis=-1)
    out = {"background": background, "background_distance": 255 * bg_dist, "shape": None, "colour": None,
           "size": None, "position": None, "iou": 0.0, "ious": {}, "centre": None, "radius": None,
           "area": 0.0, "fill": 0.0, "rgb": None, "colour_distance": None}
    core = d > _FG_THRESHOLD
    if core.sum() < 4:
        return out
    # the shape's colour: median of the clearly-foreground pixels (away from anti-aliased edges)
    fg = np.median(a[d >= 0.5 * np.percentile(d[core], 90)], axis=0)
    v = fg - bg
    alpha = np.clip(((a - bg) @ v) / max(float(v @ v), 1e-6), 0, 1) * (d > 0.5 * _FG_THRESHOLD)
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0:
        return out
    box = (xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size)
    fits = {s: _fit(s, alpha, box) for s in world.SHAPES}
    shape = max(fits, key=lambda s: fits[s][0])
    iou, (cx, cy, r) = fits[shape]
    interior = _outline(shape, cx, cy, 0.8 * r, size) > 0.99
    rgb = np.median(a[interior], axis=0) if interior.sum() >= 4 else fg
    colour, c_dist = _nearest(rgb, world.COLOURS)
    # size: the nearer grammar radius (in log radius); position: the nearest grammar centre
    size_name, position = world.nearest_size(r), world.nearest_position(cx, cy)
    area = float(alpha.mean())
    out.update(shape=shape, colour=colour, size=size_name, position=position, iou=iou,
               ious={s: round(f[0], 4) for s, f in fits.items()}, centre=(cx, cy), radius=r, area=area,
               fill=float((alpha > 0.5).sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))),
               rgb=tuple(float(255 * c) for c in rgb), colour_distance=255 * c_dist)
    return out


def verdict(image, attributes) -> dict:
    """Per attribute: does ``image`` show what ``attributes`` (an :class:`Attributes` or a caption) asks for?
    ``{name: bool for every attribute} | {"all": bool, "reading": read(image)}``. The shape is right only
    when its fitted outline also covers the foreground with IoU >= :data:`MIN_IOU`."""
    from . import parse_caption

    if isinstance(attributes, str):
        attributes = parse_caption(attributes)
    r = read(image)
    want = attributes.asdict()
    ok = {n: r[n] == want[n] for n in world.ATTRIBUTES}
    ok["shape"] = ok["shape"] and r["iou"] >= MIN_IOU
    return ok | {"all": all(ok.values()), "reading": r}


def describe(v: dict) -> str:
    """A one-line verdict, e.g. ``"right"`` or ``"wrong: colour (orange), position (center)"``."""
    wrong = [f"{n} ({v['reading'][n]}{', iou %.2f' % v['reading']['iou'] if n == 'shape' else ''})"
             for n in world.ATTRIBUTES if not v[n]]
    return "right" if not wrong else "wrong: " + ", ".join(wrong)


def check(images, attributes) -> dict:
    """Per-attribute accuracy of the pixel checker over ``images`` (PIL images or a ``(N, 3, H, W)``
    tensor) against ``attributes``; ``all_accuracy`` is the fraction right on every attribute at once."""
    vs = [verdict(im, a) for im, a in zip(images, attributes)]
    n = max(len(vs), 1)
    out = {f"{k}_accuracy": sum(v[k] for v in vs) / n for k in (*world.ATTRIBUTES, "all")}
    out["per_image"] = vs
    return out

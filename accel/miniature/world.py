"""The miniature world: a seeded, procedural, captioned image dataset.

Every image shows one flat shape on a plain background; its caption names the shape, its colour, size
and position and the background colour, e.g. ``"a large red circle on the left, black background"``.
The grammar is small enough to learn on one CPU thread and rich enough that a text-to-image model must
bind words to image content (which colour belongs to the shape, where it sits, how large it is).

Everything is deterministic for a given ``(split, seed)``: ``sample(n, seed)`` returns the first ``n``
items of an unlimited stream, and the ``"heldout"`` split is a disjoint random stream.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, asdict
from typing import Iterator

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 0.16, "large": 0.30}  # radius as a fraction of the image side
POSITIONS = {  # centre (x, y) as fractions of the image side
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
SPLITS = {"train": 0, "heldout": 1, "free": 2}
DEFAULT_SIZE = 64
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str = "large"
    position: str = "center"
    background: str = "white"

    def __post_init__(self):
        for name, options in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"unknown {name} {value!r}; the miniature world has {', '.join(options)}")

    def caption(self) -> str:
        return caption(**asdict(self))

    def asdict(self) -> dict:
        return asdict(self)


def caption(shape: str, colour: str, size: str = "large", position: str = "center",
            background: str = "white") -> str:
    """The canonical caption, e.g. ``caption(shape="circle", colour="red", position="left",
    background="black")`` -> ``"a large red circle on the left, black background"``."""
    Attributes(shape, colour, size, position, background)  # validates
    return f"a {size} {colour} {shape} {_POSITION_PHRASE[position]}, {background} background"


def parse_caption(text: str) -> Attributes:
    """Inverse of :func:`caption` (raises ``ValueError`` for text outside the grammar)."""
    words = text.strip().lower().replace(",", " ,").split()
    try:
        size, colour, shape = words[1], words[2], words[3]
        phrase = " ".join(words[4:7])
        position = next(p for p, ph in _POSITION_PHRASE.items() if ph == phrase)
        background = words[8]
        if words[0] != "a" or words[7] != "," or words[9:] != ["background"]:
            raise ValueError
    except (IndexError, StopIteration, ValueError):
        raise ValueError(f"not a caption of the miniature world: {text!r}") from None
    return Attributes(shape, colour, size, position, background)


def _rng(seed: int, split: str) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return np.random.default_rng([SPLITS[split], 0x5EED, int(seed)])


def _draw_attributes(rng: np.random.Generator) -> tuple[Attributes, np.ndarray]:
    a = Attributes(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        size=tuple(SIZES)[rng.integers(len(SIZES))],
        position=tuple(POSITIONS)[rng.integers(len(POSITIONS))],
        background=tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    )
    # continuous jitter: centre (+-0.05), radius (+-12%), colours (+-12 per channel)
    jitter = np.concatenate([rng.uniform(-0.05, 0.05, 2), rng.uniform(-0.12, 0.12, 1),
                             rng.uniform(-12, 12, 6)])
    return a, jitter


@functools.lru_cache(maxsize=4)
def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res, dtype=np.float32) + 0.5) / res
    return c[None, :], c[:, None]  # x varies along columns, y along rows (broadcast)


def _mask(shape: str, cx: float, cy: float, r: float, res: int) -> np.ndarray:
    x, y = _grid(res)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # pointing up, apex at cy - r, base at cy + 0.8 r
        top, bottom = cy - r, cy + 0.8 * r
        t = (y - top) / (bottom - top)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    raise ValueError(shape)


def render(attributes: Attributes, size: int = DEFAULT_SIZE, jitter: np.ndarray | None = None) -> torch.Tensor:
    """Render one image as a float tensor ``(3, size, size)`` in ``[0, 1]`` (anti-aliased)."""
    j = np.zeros(9) if jitter is None else jitter
    cx, cy = POSITIONS[attributes.position]
    r = SIZES[attributes.size] * (1 + j[2])
    res = size * _SUPERSAMPLE
    m = _mask(attributes.shape, cx + j[0], cy + j[1], r, res).astype(np.float32)
    m = m.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))[None]  # box filter
    fg = np.clip(np.array(COLOURS[attributes.colour]) + j[3:6], 0, 255)[:, None, None] / 255.0
    bg = np.clip(np.array(BACKGROUNDS[attributes.background]) + j[6:9], 0, 255)[:, None, None] / 255.0
    return torch.from_numpy((m * fg + (1 - m) * bg).astype(np.float32))


def stream(seed: int = 0, split: str = "train", size: int = DEFAULT_SIZE) -> Iterator[tuple[torch.Tensor, str, Attributes]]:
    """An unlimited, deterministic stream of ``(image, caption, attributes)``."""
    rng = _rng(seed, split)
    while True:
        a, jitter = _draw_attributes(rng)
        yield render(a, size, jitter), a.caption(), a


def sample(n: int, seed: int = 0, split: str = "train", size: int = DEFAULT_SIZE):
    """The first ``n`` items of the ``(seed, split)`` stream.

    Returns ``(images, captions, attributes)``: a float tensor ``(n, 3, size, size)`` in ``[0, 1]``,
    a list of ``n`` captions and a list of ``n`` :class:`Attributes`.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    it = stream(seed, split, size)
    items = [next(it) for _ in range(n)]
    images = torch.stack([i[0] for i in items]) if items else torch.empty(0, 3, size, size)
    return images, [i[1] for i in items], [i[2] for i in items]


def nearest_position(cx: float, cy: float) -> str:
    """The grammar's position whose centre is nearest to ``(cx, cy)``."""
    return min(POSITIONS, key=lambda n: (cx - POSITIONS[n][0]) ** 2 + (cy - POSITIONS[n][1]) ** 2)


def nearest_size(radius: float) -> str:
    """The grammar's size nearest to ``radius`` (in log radius)."""
    return min(SIZES, key=lambda n: abs(np.log(radius / SIZES[n])))


def free_stream(seed: int = 0, split: str = "free", size: int = DEFAULT_SIZE, spread: float = 0.3,
                radius: tuple[float, float] = (0.12, 0.34), colour_jitter: float = 20.0,
                background_jitter: float = 12.0) -> Iterator[tuple[torch.Tensor, str, Attributes]]:
    """Images rendered *off* the grammar's grid, captioned as the grammar reads them: the centre uniform in
    ``0.5 +- spread`` on each axis, the radius uniform in ``radius``, the shape's colour ``+- colour_jitter``
    and the background's ``+- background_jitter`` per channel; the caption names the nearest position and size.
    The ``"free"`` split is the independent set the miniature CLIP is measured on (free positions and sizes);
    the CLIP's training augmentation draws the same kind of images from the ``"train"`` split."""
    rng = _rng(seed, split)
    while True:
        a, _ = _draw_attributes(rng)
        cx, cy = rng.uniform(0.5 - spread, 0.5 + spread, 2)
        r = rng.uniform(*radius)
        cj, bj = rng.uniform(-colour_jitter, colour_jitter, 3), rng.uniform(-background_jitter, background_jitter, 3)
        a = Attributes(a.shape, a.colour, nearest_size(r), nearest_position(cx, cy), a.background)
        px, py = POSITIONS[a.position]
        jitter = np.concatenate([[cx - px, cy - py, r / SIZES[a.size] - 1], cj, bj])
        yield render(a, size, jitter), a.caption(), a


def free_sample(n: int, seed: int = 0, split: str = "free", size: int = DEFAULT_SIZE, **kwargs):
    """The first ``n`` items of :func:`free_stream` as ``(images, captions, attributes)`` like :func:`sample`."""
    it = free_stream(seed, split, size, **kwargs)
    items = [next(it) for _ in range(n)]
    images = torch.stack([i[0] for i in items]) if items else torch.empty(0, 3, size, size)
    return images, [i[1] for i in items], [i[2] for i in items]


def all_words() -> list[str]:
    """Every word (and punctuation) the grammar can produce: the text encoder's vocabulary."""
    words = {"a", ",", "background"}
    for phrase in _POSITION_PHRASE.values():
        words.update(phrase.split())
    for options in ATTRIBUTES.values():
        words.update(options)
    return sorted(words)


def prompts(n: int, seed: int = 0, split: str = "heldout") -> list[str]:
    """``n`` captions from the grammar (no images rendered): default evaluation/calibration prompts."""
    rng = _rng(seed, split)
    return [_draw_attributes(rng)[0].caption() for _ in range(n)]

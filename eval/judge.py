"""Does an image show what its miniature-world prompt asks for?

The judge is the miniature CLIP used zero-shot: for each attribute (shape, colour) it compares the image
with the prompt's caption and with every variant of that caption where only this attribute is changed
to another option of the grammar; the attribute is right when the prompt's own value wins. The same
judge checks held-out dataset images (whose truth is known) to show that it can be trusted.
"""
from __future__ import annotations

from dataclasses import asdict

from accel.miniature import world


def variants(attributes: world.Attributes, name: str) -> tuple[list[str], int]:
    """Captions of ``attributes`` with ``name`` set to every option; and the index of the true one."""
    options = world.ATTRIBUTES[name]
    base = asdict(attributes)
    return [world.caption(**{**base, name: o}) for o in options], options.index(base[name])


def judge(scorer, images, attributes: list[world.Attributes], names=("shape", "colour")) -> dict:
    """Per-attribute accuracy and the fraction of images right on all ``names`` at once."""
    right = {n: [] for n in names}
    for n in names:
        cands, truth = zip(*(variants(a, n) for a in attributes))
        picks = scorer.pick(images, list(cands))
        right[n] = [p == t for p, t in zip(picks, truth)]
    both = [all(r[i] for r in right.values()) for i in range(len(attributes))]
    out = {f"{n}_accuracy": sum(r) / max(len(r), 1) for n, r in right.items()}
    out["all_accuracy"] = sum(both) / max(len(both), 1)
    out["per_image"] = both
    return out


def picks(scorer, images, attributes: list[world.Attributes], names=("shape", "colour")) -> list[tuple[str, ...]]:
    """The judge's reading of each image: the option it picks for every attribute in ``names``."""
    per = []
    for n in names:
        cands, _ = zip(*(variants(a, n) for a in attributes))
        options = world.ATTRIBUTES[n]
        per.append([options[p] for p in scorer.pick(images, list(cands))])
    return list(zip(*per))


def flips(scorer, images, reference, attributes: list[world.Attributes]) -> list[bool]:
    """Per image: does the judge read another shape or colour than in the ``reference`` image of the same
    prompt and seed (an accelerated run that changed what the image shows)?"""
    return [a != b for a, b in zip(picks(scorer, images, attributes), picks(scorer, reference, attributes))]

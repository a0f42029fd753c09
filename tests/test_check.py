"""The miniature's deterministic pixel checker (accel.miniature.check), on rendered images only."""
import numpy as np
import pytest
import torch
from torchvision.transforms.functional import to_pil_image

from accel.miniature import check, world


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_reads_every_dataset_image(split):
    images, _, attrs = world.sample(60, seed=11, split=split)  # with the dataset's jitter
    r = check.check(images, attrs)
    assert r["all_accuracy"] == 1.0, [check.describe(v) for v in r["per_image"] if not v["all"]]
    assert min(v["reading"]["iou"] for v in r["per_image"]) > 0.85


def test_reads_shape_and_colour_of_free_renders():
    """Off-grid positions and sizes, wider colour shades: shape, colour and background still read right."""
    images, _, attrs = world.free_sample(80, seed=5)
    r = check.check(images, attrs)
    for k in ("shape", "colour", "background"):
        assert r[f"{k}_accuracy"] == 1.0, k


def test_every_option_of_every_attribute():
    for shape in world.SHAPES:
        for colour in world.COLOURS:
            for background in world.BACKGROUNDS:
                a = world.Attributes(shape, colour, "small", "top", background)
                assert check.verdict(world.render(a), a)["all"], a
    for size in world.SIZES:
        for position in world.POSITIONS:
            a = world.Attributes("square", "purple", size, position, "gray")
            assert check.verdict(world.render(a), a)["all"], a


def test_wrong_attributes_are_caught():
    a = world.Attributes("square", "red", "large", "left", "gray")
    x = world.render(a)
    assert check.verdict(x, a)["all"]
    for name, other in (("shape", "circle"), ("colour", "orange"), ("size", "small"), ("position", "center"),
                        ("background", "white")):
        wrong = world.Attributes(**{**a.asdict(), name: other})
        v = check.verdict(world.render(wrong), a)
        assert not v[name] and not v["all"], name
        assert [n for n in world.ATTRIBUTES if not v[n]] == [name]
        assert name in check.describe(v)


def test_red_shifted_to_orange_is_wrong():
    a = world.Attributes("circle", "red", "large", "center", "gray")
    x = world.render(a)
    shifted = x.clone()
    fg = (x - x[:, :1, :1]).abs().amax(0) > 0.2
    shifted[1][fg] += 70 / 255  # green channel up: red (220, 40, 40) -> (220, 110, 40)
    assert check.verdict(x, a)["colour"]
    assert check.verdict(shifted.clamp(0, 1), a)["reading"]["colour"] == "orange"


def test_pinched_square_is_wrong():
    """A square whose sides are bitten in (as the v1 UNet draws them) fails on its outline's coverage."""
    a = world.Attributes("square", "green", "large", "center", "white")
    x = world.render(a)
    y, xx = np.mgrid[0:64, 0:64] / 64.0
    bites = np.zeros((64, 64), bool)
    for cx, cy in ((0.5, 0.245), (0.5, 0.755), (0.245, 0.5), (0.755, 0.5)):
        bites |= (xx - cx) ** 2 + (y - cy) ** 2 < 0.11 ** 2
    bg = torch.tensor(world.BACKGROUNDS["white"]).float()[:, None] / 255
    pinched = x.clone()
    pinched[:, torch.from_numpy(bites)] = bg
    v = check.verdict(pinched, a)
    assert v["reading"]["iou"] < check.MIN_IOU and not v["shape"]
    assert check.verdict(x, a)["shape"]


def test_background_only_image():
    a = world.Attributes("cross", "blue", "small", "right", "black")
    blank = torch.tensor(world.BACKGROUNDS["black"]).float()[:, None, None].expand(3, 64, 64) / 255
    v = check.verdict(blank, a)
    assert v["background"] and not v["shape"] and not v["colour"] and not v["all"]
    assert v["reading"]["shape"] is None


def test_inputs_pil_tensor_and_caption_agree():
    images, captions, attrs = world.sample(4, seed=2, split="heldout")
    for x, c, a in zip(images, captions, attrs):
        t, p = check.verdict(x, a), check.verdict(to_pil_image(x), c)
        assert t["all"] and p["all"]
        assert t["reading"]["shape"] == p["reading"]["shape"]
        assert abs(t["reading"]["iou"] - p["reading"]["iou"]) < 0.05
    assert check.read(images[0]) == check.read(images[0])  # deterministic


def test_other_resolutions_are_read_at_64():
    a = world.Attributes("triangle", "blue", "large", "right", "white")
    assert check.verdict(world.render(a, size=128), a)["all"]
    assert check.verdict(to_pil_image(world.render(a, size=96)), a)["all"]

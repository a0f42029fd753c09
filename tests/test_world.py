"""The miniature world's dataset and grammar."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from accel import miniature
from accel.miniature import world


def test_caption_grammar():
    assert miniature.caption(shape="circle", colour="red", position="left", background="black") == \
        "a large red circle on the left, black background"
    for s in ("circle", "square", "triangle"):
        assert s in world.SHAPES
    for c in ("red", "green", "blue", "yellow"):
        assert c in world.COLOURS
    assert len(world.SHAPES) >= 4 and len(world.COLOURS) >= 6
    with pytest.raises(ValueError, match="unknown colour"):
        miniature.caption(shape="circle", colour="teal")
    with pytest.raises(ValueError, match="unknown shape"):
        miniature.caption(shape="hexagon", colour="red")


@given(st.sampled_from(world.SHAPES), st.sampled_from(tuple(world.COLOURS)), st.sampled_from(tuple(world.SIZES)),
       st.sampled_from(tuple(world.POSITIONS)), st.sampled_from(tuple(world.BACKGROUNDS)))
@settings(max_examples=60, deadline=None)
def test_parse_inverts_caption(shape, colour, size, position, background):
    a = world.Attributes(shape, colour, size, position, background)
    assert world.parse_caption(a.caption()) == a


def test_parse_rejects_other_text():
    for t in ("a red circle", "", "a large red circle on the moon, black background"):
        with pytest.raises(ValueError):
            world.parse_caption(t)


def test_sample_is_deterministic_and_splits_differ():
    x1, c1, a1 = miniature.sample(6, seed=3)
    x2, c2, a2 = miniature.sample(6, seed=3)
    assert torch.equal(x1, x2) and c1 == c2 and a1 == a2
    assert x1.shape == (6, 3, 64, 64) and x1.dtype == torch.float32
    assert 0 <= x1.min() and x1.max() <= 1
    x3, c3, _ = miniature.sample(6, seed=3, split="heldout")
    assert not torch.equal(x1, x3)
    assert miniature.sample(3, seed=3)[1] == c1[:3]  # a prefix of the same stream
    assert [a.caption() for a in a1] == c1
    with pytest.raises(ValueError, match="split"):
        miniature.sample(2, split="test")


def test_render_draws_the_colour_where_the_shape_is():
    for pos, (cx, cy) in world.POSITIONS.items():
        a = world.Attributes("square", "red", "large", pos, "black")
        img = world.render(a, 64)
        px = img[:, int(cy * 64), int(cx * 64)]
        assert px[0] > 0.8 and px[1] < 0.3 and px[2] < 0.3, pos  # red at the shape's centre
        assert img[:, 0, 0].max() < 0.1 if pos != "top" else True  # black corner


def test_shapes_are_different_masks():
    imgs = [world.render(world.Attributes(s, "blue", "large", "center", "white")) for s in world.SHAPES]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert (imgs[i] - imgs[j]).abs().mean() > 0.02


def test_prompts_follow_the_grammar():
    ps = miniature.prompts(20, seed=1)
    assert len(set(ps)) > 10
    for p in ps:
        world.parse_caption(p)

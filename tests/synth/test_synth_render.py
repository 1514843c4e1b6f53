import numpy as np
import pytest

from segpipe.synth.render import HAZE, noise, render, soften
from segpipe.synth.scene import Paint, Region, Scene, Thing, make_scene, rect


def flat_scene():
    s = Scene(32, 32)
    soil = s.add_paint(Paint((100, 80, 60), (100, 80, 60), 0.0, 0.0, 0.0, 0.0))
    red = s.add_paint(Paint((200, 0, 0), (200, 0, 0), 0.0, 0.0, 0.0, 0.0))
    blue = s.add_paint(Paint((0, 0, 200), (0, 0, 200), 0.0, 0.0, 0.0, 0.0))
    s.regions.append(Region(0, [rect(16, 16, 40, 40, 0.0)], soil))
    s.things = [
        Thing(9, [(rect(10, 10, 12, 12, 0.0), red)], 0.0),
        Thing(8, [(rect(16, 16, 12, 12, 0.0), blue)], 0.0),
    ]
    return s


def test_later_things_occlude_earlier_ones():
    out = render(flat_scene(), np.random.default_rng(0))
    assert out.instances[12, 12] == 2 and out.semantic[12, 12] == 8  # overlap: the later truck wins
    assert out.instances[6, 6] == 1 and out.semantic[6, 6] == 9
    assert out.instances[28, 28] == 0 and out.semantic[28, 28] == 0
    assert out.image.dtype == np.uint8 and out.image.shape == (32, 32, 3)
    # no noise, no shadow: inside a flat region the colour is the paint's times the exposure
    assert abs(int(out.image[6, 6, 0]) - 200) <= 1 + 200 * 0.09


def test_semantic_follows_instances():
    for i in range(5):
        rng = np.random.default_rng([2, i])
        scene = make_scene(rng, 96, 128)
        out = render(scene, rng)
        assert out.semantic.shape == (96, 128) and out.image.shape == (96, 128, 3)
        for k, t in enumerate(scene.things, 1):
            assert (out.semantic[out.instances == k] == t.class_id).all()
        assert set(np.unique(out.semantic[out.instances == 0])) <= {0, 1, 2, 3, 4}


def test_noise_and_soften():
    n = noise(np.random.default_rng(0), 40, 50, 8.0)
    assert n.shape == (40, 50) and 0.2 < n.std() < 1.5
    x = np.zeros((5, 5), np.float32)
    x[2, 2] = 36.0
    y = soften(x)
    assert np.isclose(y.sum(), 36.0) and y[2, 2] == 16.0 and y[1, 1] == 1.0


def test_haze_veils_the_photo_towards_the_haze_colour():
    clear = render(flat_scene(), np.random.default_rng(0)).image.astype(float)
    scene = flat_scene()
    scene.haze = 0.5
    hazy = render(scene, np.random.default_rng(0)).image.astype(float)
    # half of each pixel is the haze colour: the red truck pales, contrast halves
    assert np.allclose(hazy[6, 6], 0.5 * clear[6, 6] + 0.5 * np.array(HAZE), atol=1.5)
    assert hazy.std(axis=(0, 1)) == pytest.approx(0.5 * clear.std(axis=(0, 1)), rel=0.05)

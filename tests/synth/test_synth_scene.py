import numpy as np
import pytest

from segpipe.synth.classes import THING_IDS
from segpipe.synth.scene import SOIL, VEG, WATER, Paint, Scene, Thing, band, make_scene, rect
from segpipe.synth.sites import GROUNDS


def test_rect_corners():
    r = rect(10, 20, 8, 4, 0.0)
    assert np.allclose(r, [[6, 18], [14, 18], [14, 22], [6, 22]])
    r90 = rect(0, 0, 8, 4, np.pi / 2)
    assert np.allclose(np.ptp(r90, axis=0), [4, 8])


def test_band_covers_each_segment():
    polys = band(np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]), 2.0)
    assert len(polys) == 3  # two segments and one joint disc


def test_same_seed_same_scene_and_thing_counts():
    for i in range(30):
        a = make_scene(np.random.default_rng([0, i]), 256, 256)
        b = make_scene(np.random.default_rng([0, i]), 256, 256)
        assert len(a.things) == len(b.things) and a.paints == b.paints
        for ta, tb in zip(a.things, b.things):
            assert all(np.array_equal(pa, pb) and ia == ib for (pa, ia), (pb, ib) in zip(ta.parts, tb.parts))
        assert 3 <= len(a.things) <= 12
        assert all(t.class_id in THING_IDS and t.group == -1 for t in a.things)
        assert all(0 <= p < len(a.paints) for t in a.things for _, p in t.parts)


def test_crowd_members_are_consecutive():
    for i in range(10):
        s = make_scene(np.random.default_rng([1, i]), 256, 256, crowd_fraction=1.0)
        groups = [k for k, t in enumerate(s.things) if t.group == 0]
        assert len(groups) >= 6
        assert groups == list(range(groups[0], groups[0] + len(groups)))
        assert len({s.things[k].class_id for k in groups}) == 1


def test_scene_refuses_too_many_paints():
    s = Scene(8, 8)
    p = Paint((0, 0, 0), (0, 0, 0), 0.0, 0.0, 0.0, 0.0)
    for _ in range(255):
        s.add_paint(p)
    try:
        s.add_paint(p)
    except ValueError as e:
        assert "255" in str(e)
    else:
        raise AssertionError("256th paint accepted")
    assert isinstance(Thing(5, [], 0.0).group, int)


@pytest.mark.parametrize("density", [0.1, 0.5, 1.5, 2.0, 4.0])
def test_density_scales_the_objects_of_the_same_scene(density):
    """The number of things is drawn after the ground is laid out, so a scene at another density
    keeps its ground and scales its object count exactly (at least one object)."""
    for i in range(20):
        base = make_scene(np.random.default_rng([0, i]), 128, 128)
        dense = make_scene(np.random.default_rng([0, i]), 128, 128, density=density)
        assert dense.regions[0].polygons[0].tolist() == base.regions[0].polygons[0].tolist()
        assert dense.paints[0] == base.paints[0]  # the soil
        assert len(dense.things) == max(1, round(len(base.things) * density))


def test_the_densest_crowded_scenes_fit_the_instance_and_paint_maps():
    for i in range(30):
        s = make_scene(np.random.default_rng([3, i]), 256, 256, 1.0, density=4.0, ground=GROUNDS["arid"])
        assert 12 <= len(s.things) <= 254 and len(s.paints) <= 255


def test_arid_ground_is_sandier_with_less_vegetation_and_water():
    def stats(ground):
        veg = water = 0
        soil = []
        for i in range(60):
            s = make_scene(np.random.default_rng([4, i]), 128, 128, ground=ground)
            veg += sum(r.class_id == VEG for r in s.regions)
            water += sum(r.class_id == WATER for r in s.regions)
            soil.append(np.mean(s.paints[s.regions[0].paint].color))
            assert s.regions[0].class_id == SOIL
        return veg / 60, water / 60, float(np.mean(soil))

    veg_d, water_d, soil_d = stats(GROUNDS["default"])
    veg_a, water_a, soil_a = stats(GROUNDS["arid"])
    assert veg_a < veg_d - 1.0 and water_a < water_d - 0.2
    assert soil_a > soil_d + 50


def test_lighting_warmth_and_haze_set_the_scene_light():
    base = make_scene(np.random.default_rng([5, 0]), 64, 64)
    lit = make_scene(np.random.default_rng([5, 0]), 64, 64, lighting=0.5, warmth=0.2, haze=0.3)
    assert base.haze == 0.0 and lit.haze == 0.3
    assert lit.gain == pytest.approx(base.gain * 0.5)
    assert lit.tint[0] / lit.tint[2] == pytest.approx(base.tint[0] / base.tint[2] * 1.2 / 0.8)
    assert lit.paints == base.paints and lit.sun == base.sun  # light, not layout

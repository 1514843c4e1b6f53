import numpy as np

from segpipe.synth.classes import THING_IDS
from segpipe.synth.scene import Paint, Scene, Thing, band, make_scene, rect


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

import dataclasses

import pytest

from segpipe.params import SynthParams
from segpipe.synth.sites import GROUNDS, SITE_KEYS, SITES, site_preset


def test_ground_names_are_the_params_palettes():
    assert tuple(GROUNDS) == SynthParams.PALETTES


def test_presets_set_every_site_key_and_default_is_the_params_default():
    fields = {f.name: f.default for f in dataclasses.fields(SynthParams)}
    assert set(SITE_KEYS) <= set(fields)
    for name, preset in SITES.items():
        assert tuple(preset) == SITE_KEYS, name
        SynthParams(**preset)  # in range
    assert SITES["default"] == {k: fields[k] for k in SITE_KEYS}
    assert SITES["site2"]["palette"] != "default"


def test_site_preset_is_a_copy_and_names_the_valid_sites():
    p = site_preset("site2")
    p["density"] = 3.0
    assert SITES["site2"]["density"] == 1.5
    with pytest.raises(KeyError, match="unknown site 'site3'; valid: default, site2"):
        site_preset("site3")


def test_grounds_are_valid_and_arid_is_sandier_and_sparser():
    for name, g in GROUNDS.items():
        for kind, anchors in g.anchors().items():
            assert anchors, (name, kind)
            assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in anchors), (name, kind)
        assert 0 <= g.veg_patches[0] < g.veg_patches[1] and 0 <= g.water_chance <= 1

    def mean_brightness(colours):
        return sum(sum(c) for c in colours) / (3 * len(colours))

    default, arid = GROUNDS["default"], GROUNDS["arid"]
    assert mean_brightness(arid.soil) > mean_brightness(default.soil) + 50
    assert mean_brightness(arid.road) > mean_brightness(default.road) + 40
    assert arid.veg_patches[1] < default.veg_patches[1] and arid.water_chance < default.water_chance

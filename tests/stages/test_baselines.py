import numpy as np
import pytest

from segpipe.stages.baselines import ColourLookup, Majority, colour_index, fit_baselines


def image(colours):
    """A 1 x N image of the given RGB colours."""
    return np.array([colours], dtype=np.uint8)


def test_colour_index_keeps_the_top_bits_of_each_channel():
    img = image([(0, 0, 0), (255, 255, 255), (0b1010_0000, 0b0001_1111, 0b1111_0000)])
    assert colour_index(img, 4).tolist() == [[0, 4095, (0b1010 << 8) | (0b0001 << 4) | 0b1111]]
    assert colour_index(img, 1).tolist() == [[0, 7, 0b101]]
    with pytest.raises(ValueError, match="uint8"):
        colour_index(img.astype(np.float32), 4)


def test_baselines_fit_on_a_hand_made_case():
    red, green, grey = (200, 10, 10), (10, 200, 10), (120, 120, 120)
    # class 0 (soil) is the majority; red pixels are mostly class 2, green always class 1;
    # grey is labelled once as 1 and twice as 0; the ignore label (255) never counts
    pairs = [
        (image([red, red, red, green, grey, grey, grey, grey]), np.array([[2, 2, 0, 1, 0, 0, 1, 255]], np.uint8)),
        (image([grey, grey, grey, grey]), np.array([[0, 0, 0, 255]], np.uint8)),
    ]
    fitted = fit_baselines(pairs, num_classes=3, ignore_index=255, bits=4)
    assert fitted["majority"] == Majority(0)
    colour = fitted["colour"]
    assert isinstance(colour, ColourLookup) and colour.table.shape == (4096,)
    test = image([red, green, grey, (0, 0, 255)])  # blue was never seen: the majority class
    assert colour.predict(test).tolist() == [[2, 1, 0, 0]]
    assert fitted["majority"].predict(test).tolist() == [[0, 0, 0, 0]]


def test_ties_go_to_the_lowest_class_id_and_empty_data_is_an_error():
    pairs = [(image([(9, 9, 9), (9, 9, 9)]), np.array([[3, 1]], np.uint8))]
    fitted = fit_baselines(pairs, num_classes=4, ignore_index=255, bits=2)
    assert fitted["majority"].label == 1 and fitted["colour"].predict(image([(9, 9, 9)])).tolist() == [[1]]
    with pytest.raises(ValueError, match="no labelled pixel"):
        fit_baselines([(image([(1, 1, 1)]), np.array([[255]], np.uint8))], num_classes=2, ignore_index=255)
    with pytest.raises(ValueError, match="differ in size"):
        fit_baselines([(image([(1, 1, 1)]), np.zeros((2, 2), np.uint8))], num_classes=2, ignore_index=255)


def test_baselines_are_fitted_on_train_and_scored_like_models(tiny_shards, tmp_path, capsys):
    import json

    from segpipe.metrics.semantic import ConfusionMatrix, compute
    from segpipe.params import BaselinesParams, EvaluateParams
    from segpipe.shards import iter_samples, open_shards
    from segpipe.stages import baselines

    out = tmp_path / "baselines"
    (tmp_path / "defaults.yaml").write_text("{}\n")
    baselines.main(["--shards", str(tiny_shards), "--out", str(out), "--params", str(tmp_path / "defaults.yaml")])
    printed = capsys.readouterr().out
    assert "baseline majority on val" in printed and "baseline colour on val" in printed
    s = open_shards(tiny_shards)
    fitted = fit_baselines(((x["image"], x["semantic"]) for x in iter_samples(s, split="train")), s.num_classes,
                           s.ignore_index, BaselinesParams().colour_bits)
    for name in ("majority", "colour"):
        m = json.loads((out / name / "metrics.json").read_text())
        cm = ConfusionMatrix(s.num_classes, s.ignore_index)
        for x in iter_samples(s, split="val"):
            cm.update(x["semantic"], fitted[name].predict(x["image"]))
        assert m["miou"] == pytest.approx(compute(cm.mat)["miou"])
        assert m["baseline"] == name and m["shards_manifest_sha256"] == s.manifest_sha256 and m["split"] == "val"
        assert m["scoring"] == EvaluateParams().scoring_key()
        assert "miou_things" in m and (out / name / "per_class_iou.csv").read_text().startswith("class,iou,boundary_iou\n")
        assert 0 <= m["boundary_iou"] <= 1
        (collection,) = m["per_collection"]
        assert m["per_collection"][collection]["miou"] == pytest.approx(m["miou"])

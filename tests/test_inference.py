"""segpipe.inference: one padding policy, one detection selection, one renderer, one COCO writer,
one palette, behind the entry points evaluate, train validation, predict and export use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_tiling import PerPixel, site_image  # the scene and the 1x1-conv model of the tiling tests
from torch import nn

from segpipe import inference
from segpipe.inference import Request, predict_images, predict_tiled, select_detections
from segpipe.models import build_model, normalize
from segpipe.params import DetectionParams, MaskFormerPanopticParams
from segpipe.tiling import Instance, Window, crop_instance, predict_semantic

SEMANTIC = Request(frozenset({"semantic"}), 3, 255)


class WholeImage(nn.Module):
    """Every pixel's logits depend on the mean of the whole (padded) input: the padding shows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3), keepdim=True)
        return torch.cat([x[:, :1] - m[:, :1], m[:, 1:2].expand_as(x[:, :1]), x[:, 2:] * 0], 1)


class Detector(nn.Module):
    """An instance-only model that records how it is called and returns fixed raw detections."""

    def __init__(self, raw: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.raw, self.calls = raw, []

    def predict_instances(self, images, score_threshold, mask_threshold, max_detections):
        self.calls.append((tuple(images.shape), score_threshold, mask_threshold, max_detections))
        return [{k: v.clone() for k, v in self.raw.items()} for _ in images]


def raw_detections(h: int = 8, w: int = 8) -> dict[str, torch.Tensor]:
    masks = torch.zeros(4, 1, h, w)
    masks[0, 0, :4, :4] = 0.5  # exactly at the mask threshold: kept (>=)
    masks[1, 0, 2:6, 2:6] = 0.9
    masks[2, 0] = 0.49  # below the mask threshold everywhere: empty, dropped
    masks[3, 0, 6:, 6:] = 0.9
    return {"labels": torch.tensor([1, 2, 1, 2]), "scores": torch.tensor([0.3, 0.6, 0.9, 0.05]),
            "boxes": torch.tensor([[-3.0, -1.0, 4.0, 4.0], [2, 2, 6, 6], [0, 0, 8, 8], [6, 6, 99, 99]]), "masks": masks}


def test_pad_replicates_edges_to_a_multiple_of_32():
    x = normalize(site_image(37, 50))
    padded = inference.pad(x, *inference.padded_size(37, 50))
    assert padded.shape == (1, 3, 64, 64)
    assert torch.equal(padded[..., :37, :50], x)
    assert torch.equal(padded[..., 36:, :50], x[..., 36:37, :].expand(-1, -1, 28, -1))  # the last row, repeated
    assert torch.equal(padded[..., :37, 49:], x[..., :, 49:50].expand(-1, -1, -1, 15))


def test_batched_images_of_any_sizes_equal_per_image_predictions():
    images = [site_image(h, w, i) for i, (h, w) in enumerate(((37, 50), (64, 20), (33, 33), (100, 90)))]
    model = PerPixel().eval()
    batched = predict_images(model, images, SEMANTIC)
    for im, pred in zip(images, batched):
        assert pred.labels.shape == im.shape[:2] and pred.labels.dtype == np.uint8 and pred.instances is None
        with torch.no_grad():
            np.testing.assert_array_equal(pred.labels, model(normalize(im)).argmax(1)[0].numpy())


def test_a_prediction_does_not_depend_on_what_it_is_batched_with():
    small, large = site_image(40, 40, 1), site_image(130, 70, 2)
    model = WholeImage().eval()
    alone = predict_images(model, [small], SEMANTIC)[0].labels
    together = predict_images(model, [large, small, large], SEMANTIC)[1].labels
    np.testing.assert_array_equal(alone, together)


def test_selection_thresholds_drops_empty_masks_orders_and_clips():
    d = DetectionParams(score_threshold=0.1, mask_threshold=0.5, max_detections=10)
    kept = select_detections(raw_detections(), 7, 7, d)
    # 0.9 has an empty mask at 0.5, 0.05 is below the score threshold
    assert [(k.label, k.score) for k in kept] == [(2, pytest.approx(0.6)), (1, pytest.approx(0.3))]
    assert kept[1].box == (0, 0, 4, 4) and kept[1].bbox == (0.0, 0.0, 4.0, 4.0)  # clipped to the image
    assert select_detections(raw_detections(), 7, 7, DetectionParams(0.1, 0.5, 1))[0].score == pytest.approx(0.6)
    assert select_detections(raw_detections(), 7, 7, DetectionParams(0.95, 0.5, 10)) == []


def test_instance_models_are_called_through_one_signature_and_rendered():
    model = Detector(raw_detections(32, 32))
    request = Request(frozenset({"instances"}), 3, 255, DetectionParams(0.1, 0.5, 7))
    pred = predict_images(model, [np.zeros((7, 7, 3), np.uint8)], request)[0]
    assert model.calls == [((1, 3, 32, 32), 0.1, 0.5, 7)]
    assert [k.label for k in pred.instances] == [2, 1]
    expected = np.full((7, 7), 255, np.uint8)
    expected[:4, :4] = 1
    expected[2:6, 2:6] = 2  # the better detection wins where both cover
    np.testing.assert_array_equal(pred.labels, expected)


def test_render_best_score_wins_ties_go_to_the_earlier_and_uncovered_is_none():
    m = np.ones((2, 2), bool)
    a, b, c = Instance(1, 0.5, 0, 0, m), Instance(2, 0.9, 1, 1, m), Instance(3, 0.5, 0, 0, m)
    out = inference.render_instances([a, b, c], 4, 4, 255)
    assert out.tolist() == [[1, 1, 255, 255], [1, 2, 2, 255], [255, 2, 2, 255], [255, 255, 255, 255]]


def test_coco_results_encode_the_mask_and_the_model_box():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    full = np.zeros((37, 53), dtype=bool)
    full[5:30, 10:40] = rng.random((25, 30)) > 0.4
    inst = crop_instance(1, 0.123456, full, bbox=(9.5, 4.0, 40.25, 30.0))
    other = crop_instance(2, 0.5, full)
    assert inference.rle_counts(inst, 37, 53)[0] == np.flatnonzero(full.T.ravel())[0]
    [r] = inference.coco_results([inst, other], 7, 37, 53, category_ids={1})
    assert r["image_id"] == 7 and r["category_id"] == 1 and r["score"] == 0.12346 and r["area"] == full.sum()
    assert r["bbox"] == [9.5, 4.0, 30.75, 26.0]
    decoded = mask_utils.decode({"size": [37, 53], "counts": r["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), full)
    assert r["segmentation"]["counts"] == mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))["counts"].decode()
    assert inference.coco_results([other], 7, 37, 53)[0]["bbox"] == [10.0, 5.0, 30.0, 25.0]  # no model box: the mask's


def test_one_palette_black_for_values_without_a_class():
    pal = inference.palette([{"id": 0, "name": "a", "color": [1, 2, 3]}, {"id": 300, "name": "b"}])
    assert len(pal) == 302 and pal[0].tolist() == [1, 2, 3] and pal[300].tolist() == [128, 128, 128]
    assert pal[255].tolist() == list(inference.NO_CLASS_COLOR) and pal[-1].tolist() == list(inference.NO_CLASS_COLOR)
    assert inference.colorize(np.array([[0, 5000]]), pal).tolist() == [[[1, 2, 3], list(inference.NO_CLASS_COLOR)]]


def test_the_legend_names_the_colour_of_each_class_shown():
    classes = [{"id": 0, "name": "ground", "color": [120, 90, 60]}, {"id": 3, "name": "excavator", "color": [255, 200, 0]},
               {"id": 7, "name": "worker", "color": [255, 0, 255]}]
    pal = inference.palette(classes)
    # classes in id order, values without a class (ignore 255, no detection) once, last
    assert inference.legend_entries([7, 255, 0, 250, 0], classes, pal) == [
        ("ground", (120, 90, 60)), ("worker", (255, 0, 255)), (inference.NO_CLASS_NAME, inference.NO_CLASS_COLOR)]
    strip = inference.legend([0, 3, 7, 255], classes, pal, width=90)
    assert strip.dtype == np.uint8 and strip.shape[1] == 90 and strip.shape[2] == 3
    colours = {tuple(c) for c in strip.reshape(-1, 3)}
    assert {(120, 90, 60), (255, 200, 0), (255, 0, 255), (0, 0, 0), (255, 255, 255)} <= colours  # swatches on white
    assert strip.shape[0] > inference.legend([0], classes, pal, width=90).shape[0]  # four names wrap into more rows
    wide = inference.legend([0, 3, 7, 255], classes, pal, width=600)
    assert wide.shape[0] < strip.shape[0]


def test_an_image_within_one_tile_is_predicted_whole():
    torch.manual_seed(0)
    model = build_model("unet", 3, base_channels=4, depth=3).eval()
    image = site_image(50, 77)
    tiled = predict_tiled(model, image, SEMANTIC, tile=256, overlap=64, batch_size=2)
    np.testing.assert_array_equal(tiled.labels, predict_images(model, [image], SEMANTIC)[0].labels)


def test_unet_tiled_agrees_with_whole_image_without_seams():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("unet", 3, base_channels=4, depth=3).eval()
    image = site_image(700, 1000)
    def logits(t: torch.Tensor) -> torch.Tensor:  # what predict_tiled runs on a batch of tiles
        return torch.stack(inference._semantic(model, inference.pad(t, *inference.padded_size(*t.shape[-2:])),
                                               [t.shape[-2:]] * len(t), 3))

    tiled, whole = (predict_semantic(logits, image, lambda x: normalize(x)[0], window, return_probs=True)
                    for window in (Window(256, 64), Window(1024, 0)))
    assert (tiled.argmax(0) == whole.argmax(0)).float().mean().item() > 0.98
    labels = predict_tiled(model, image, SEMANTIC, tile=256, overlap=64, batch_size=4).labels
    np.testing.assert_array_equal(labels, tiled.argmax(0).numpy())
    err = (tiled - whole).abs().amax(0)  # no seams: the error along tile borders is no larger than elsewhere
    cols = torch.tensor([192, 256, 384, 448, 576, 640, 744])
    assert err[:, cols].mean() < 3 * err.mean() + 1e-3


def test_predictor_uses_channels_last_where_the_registry_says(tiny_checkpoint):
    from segpipe.inference import Predictor

    unet = Predictor.load(tiny_checkpoint("unet", base_channels=4, depth=2))
    conv = next(m for m in unet.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not unet.model.training
    assert unet.request.outputs == {"semantic"} and unet.request.ignore_index == 255


def test_map_rows_runs_the_worker_in_order_locally_and_refuses_unknown_engines(tiny_checkpoint):
    ckpt = tiny_checkpoint("unet", base_channels=4, depth=2)
    rows = [{"n": i} for i in range(3)]
    assert list(inference.map_rows(rows, ckpt, Doubler, {"by": 2})) == [{"n": 0, "arch": "unet"},
                                                                        {"n": 2, "arch": "unet"},
                                                                        {"n": 4, "arch": "unet"}]
    with pytest.raises(ValueError, match="unknown inference engine 'spark'; valid: local, ray"):
        inference.map_rows(rows, ckpt, Doubler, engine="spark")


class Doubler:
    def __init__(self, predictor, by: int = 1) -> None:
        self.arch, self.by = predictor.meta.arch, by

    def __call__(self, row):
        return {"n": row["n"] * self.by, "arch": self.arch}


# --------------------------------------------------------------------------------------
# Panoptic outputs
# --------------------------------------------------------------------------------------


def test_maskformer_panoptic_prediction_is_its_mask_classification_post_processed(tiny_checkpoint):
    from segpipe.inference import PanopticSettings, Predictor
    from segpipe.panoptic import maskformer_panoptic

    torch.manual_seed(0)
    ckpt = tiny_checkpoint("maskformer", backbone="resnet18", num_queries=6, hidden_dim=32, dec_layers=1, nheads=2,
                           dim_feedforward=32, conv_dim=32, mask_dim=32, thing_ids=[1, 2])
    loose = PanopticSettings(maskformer=MaskFormerPanopticParams(object_mask_threshold=0.0, overlap_threshold=0.0))
    p = Predictor.load(ckpt, panoptic=loose)
    assert p.request.outputs == {"semantic", "instances", "panoptic"} and p.request.thing_ids == (1, 2)
    image = site_image(50, 70)  # padded to 64 x 96, cropped back
    pred = p.images([image])[0]
    seg_map, info = pred.panoptic
    assert seg_map.shape == (50, 70) and seg_map.dtype == np.int32 and info
    x = inference.pad(normalize(image), 64, 96)
    cls, masks = p.model.mask_classification(x)
    expect_map, expect_info = maskformer_panoptic(cls[0], masks[0, :, :50, :70], (1, 2), MaskFormerPanopticParams(object_mask_threshold=0.0, overlap_threshold=0.0))
    np.testing.assert_array_equal(seg_map, expect_map)
    assert info == expect_info
    assert Predictor.load(ckpt, outputs={"semantic"}).images([image])[0].panoptic is None


def test_panoptic_labels_and_instance_masks():
    seg_map = np.array([[0, 1], [2, 2]], np.int32)
    labels = inference.panoptic_labels((seg_map, [{"id": 1, "category_id": 4}, {"id": 2, "category_id": 0}]), 255)
    np.testing.assert_array_equal(labels, [[255, 4], [0, 0]])
    d = Instance(3, 0.9, 1, 1, np.array([[True, False], [True, True]]))
    masks = inference.instance_masks([d], 3, 4)
    assert masks.shape == (1, 3, 4) and masks.sum() == 3 and masks[0, 1, 1] and masks[0, 2, 2]


def test_fuse_takes_stuff_from_the_semantic_prediction_and_things_from_the_instances():
    from segpipe.inference import Prediction, fuse
    from segpipe.params import FusionParams

    sem = np.zeros((8, 8), np.uint8)
    sem[:, 4:] = 1
    sem[2:6, 2:6] = 2  # a thing the semantic model sees
    thing = np.ones((4, 4), bool)
    weak = Instance(2, 0.2, 0, 0, np.ones((2, 2), bool))  # below score_threshold
    pan_map, info = fuse(Prediction(sem), Prediction(sem, [Instance(2, 0.9, 2, 2, thing), weak]), [2],
                         FusionParams(stuff_min_area=4))
    assert [(s["category_id"], s["isthing"], s["area"]) for s in info] == [(2, True, 16), (0, False, 24), (1, False, 24)]
    assert (pan_map[2:6, 2:6] == info[0]["id"]).all() and pan_map[0, 0] == info[1]["id"]
    _, info = fuse(Prediction(sem), Prediction(sem, []), [2], FusionParams(stuff_min_area=25))
    assert info == []  # each stuff region has 24 px: void
    with pytest.raises(ValueError, match="no detections"):
        fuse(Prediction(sem), Prediction(sem), [2])


# --------------------------------------------------------------------------------------
# Class probabilities and the embedding (segpipe audit, select, drift)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, strips", [((50, 77), 1), ((150, 130), 3)])
def test_probabilities_take_predict_tileds_path(size, strips):
    """Whole within a tile, by sliding window beyond: their argmax is predict_tiled's labels."""
    torch.manual_seed(0)
    model = build_model("unet", 3, base_channels=4, depth=2).eval()
    image = site_image(*size)
    found = list(inference.iter_probabilities(model, image, SEMANTIC, tile=64, overlap=16, batch_size=2))
    assert len(found) == strips and found[0].y0 == 0 and found[-1].y1 == size[0]
    probs = inference.predict_probabilities(model, "unet", image, SEMANTIC, 64, 16, 2).probs
    assert probs.shape == (3, *size) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), predict_tiled(model, image, SEMANTIC, 64, 16, 2).labels)
    with pytest.raises(ValueError, match="need a semantic output"):
        next(inference.iter_probabilities(model, image, Request(frozenset({"instances"}), 3, 255), 64, 16, 2))


def test_embedding_is_the_mean_of_the_classifier_input_over_the_image():
    torch.manual_seed(0)
    model = build_model("unet", 3, base_channels=4, depth=2).eval()
    assert inference.classifier_module(model, "unet") is model.classifier
    seen = []
    handle = model.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    image = site_image(40, 50)  # padded to 64 x 64: only the image's 40 x 50 pixels count
    embedding = inference.predict_probabilities(model, "unet", image, SEMANTIC, 64, 16, 2, embed=True).embedding
    handle.remove()
    np.testing.assert_allclose(embedding, seen[0][0, :, :40, :50].mean(dim=(1, 2)).numpy(), rtol=1e-5)
    assert handle is not None and not model.classifier._forward_pre_hooks  # the pool's hook is gone too
    # by tiles: the pixel-weighted mean of the tiles' embeddings, close to the whole image's
    big = site_image(150, 130)
    whole = inference.predict_probabilities(model, "unet", big, SEMANTIC, 256, 16, 2, embed=True).embedding
    tiled = inference.predict_probabilities(model, "unet", big, SEMANTIC, 64, 16, 2, embed=True).embedding
    assert embedding.shape == (4,) and np.abs(tiled - whole).max() < 0.1 * np.abs(whole).max()


def test_classifier_module_of_each_semantic_architecture(tiny_maskformer):
    expect = {"fcn8s": "score32", "deeplabv3": "head.1", "maskformer": "class_embed"}
    for arch, name in expect.items():
        kwargs = tiny_maskformer if arch == "maskformer" else {}
        model = build_model(arch, 3, **kwargs)
        assert inference.classifier_module(model, arch) is model.get_submodule(name)
    torch.manual_seed(0)
    mf = build_model("maskformer", 3, **tiny_maskformer).eval()  # reads B x Q x D queries: pooled over them
    emb = inference.predict_probabilities(mf, "maskformer", site_image(40, 40), SEMANTIC, 64, 16, 1, embed=True)
    assert emb.embedding.shape == (tiny_maskformer["hidden_dim"],) and np.isfinite(emb.embedding).all()

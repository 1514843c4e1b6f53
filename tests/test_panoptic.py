"""Panoptic post-processing on hand-made outputs: Mask2Former-style query merging and Panoptic
FPN-style fusion (overlaps, thresholds, stuff merging, small stuff to void, segment ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.metrics.panoptic import PQStat
from segpipe.panoptic import fuse_panoptic, maskformer_panoptic
from segpipe.params import FusionParams, MaskFormerPanopticParams

# --------------------------------------------------------------------------------------
# maskformer_panoptic: 3 classes (0, 1 stuff; 2 thing) + "no object", a 4 x 6 image
# --------------------------------------------------------------------------------------

THINGS = [2]


def _logits(cls: int | None, strength: float = 10.0) -> list[float]:
    """Class logits (K + 1 = 4) whose argmax is ``cls`` (None: all equal, probability 0.25)."""
    row = [0.0] * 4
    if cls is not None:
        row[cls] = strength
    return row


def _mask(rows: slice, cols: slice) -> torch.Tensor:
    m = torch.full((4, 6), -10.0)
    m[rows, cols] = 10.0
    return m


def _queries():
    every = slice(None)
    queries = [
        (_logits(0), _mask(every, slice(0, 2))),            # q0 stuff 0, cols 0-1
        (_logits(0), _mask(slice(0, 2), slice(4, 6))),      # q1 stuff 0 again, cols 4-5 rows 0-1
        (_logits(2), _mask(every, slice(2, 4))),            # q2 thing, cols 2-3
        (_logits(2, 8.0), _mask(every, slice(2, 5))),       # q3 thing, cols 2-4, lower score: wins 2 of 12 px
        (_logits(3), _mask(slice(2, 4), slice(5, 6))),      # q4 "no object"
        (_logits(None), _mask(slice(2, 4), slice(5, 6))),   # q5 score 0.25
    ]
    return torch.tensor([q[0] for q in queries]), torch.stack([q[1] for q in queries])


def test_maskformer_merges_stuff_and_drops_overlapped_and_unsure_queries():
    cls, masks = _queries()
    seg, info = maskformer_panoptic(cls, masks, THINGS)
    assert seg.dtype == np.int32
    # q3 wins only col 4 rows 2-3 (2 / 12 < 0.8): dropped, those pixels stay void; col 5 rows
    # 2-3 belong to no kept query's mask (probability < 0.5 everywhere): void.
    np.testing.assert_array_equal(seg, [[1, 1, 2, 2, 1, 1]] * 2 + [[1, 1, 2, 2, 0, 0]] * 2)
    assert [(s["id"], s["category_id"], s["isthing"], s["iscrowd"], s["area"], s["bbox"]) for s in info] == [
        (1, 0, False, 0, 12, [0.0, 0.0, 6.0, 4.0]),
        (2, 2, True, 0, 8, [2.0, 0.0, 2.0, 4.0]),
    ]
    assert info[0]["score"] == pytest.approx(torch.softmax(cls[0], 0)[0].item())


def test_maskformer_thresholds_are_keyword_arguments():
    cls, masks = _queries()
    # A lower overlap threshold keeps q3 (2 / 12 >= 0.1) on the pixels it won.
    seg, info = maskformer_panoptic(cls, masks, THINGS, MaskFormerPanopticParams(overlap_threshold=0.1))
    np.testing.assert_array_equal(seg[2:], [[1, 1, 2, 2, 3, 0]] * 2)
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 0, 12), (2, 2, 8), (3, 2, 2)]
    # Scores are ~0.99986 (q0-q2) and ~0.99899 (q3): above 0.9995 only q0-q2 are kept, and
    # nothing survives a threshold of 0.99995.
    seg, info = maskformer_panoptic(cls, masks, THINGS, MaskFormerPanopticParams(object_mask_threshold=0.9995, overlap_threshold=0.1))
    assert [s["id"] for s in info] == [1, 2] and (seg[2:, 4] == 0).all()
    seg, info = maskformer_panoptic(cls, masks, THINGS, MaskFormerPanopticParams(object_mask_threshold=0.99995))
    assert info == [] and (seg == 0).all()


def test_maskformer_things_stay_apart_and_label_divisor_encodes_the_class():
    every = slice(None)
    cls = torch.tensor([_logits(2), _logits(2), _logits(1), _logits(1)])
    masks = torch.stack([_mask(every, slice(0, 2)), _mask(every, slice(2, 4)),
                         _mask(every, slice(4, 5)), _mask(every, slice(5, 6))])
    seg, info = maskformer_panoptic(cls.numpy(), masks.numpy(), THINGS, label_divisor=1000)
    np.testing.assert_array_equal(seg, [[2001, 2001, 2002, 2002, 1001, 1001]] * 4)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [(2001, 2, True), (2002, 2, True), (1001, 1, False)]
    with pytest.raises(ValueError, match="more than 1 segments of category 2"):
        maskformer_panoptic(cls, masks, THINGS, label_divisor=2)


def test_maskformer_checks_shapes():
    with pytest.raises(ValueError, match="3 queries in class_logits but 2"):
        maskformer_panoptic(torch.zeros(3, 4), torch.zeros(2, 4, 4), THINGS)
    with pytest.raises(ValueError, match="mask_logits has shape"):
        maskformer_panoptic(torch.zeros(3, 4), torch.zeros(3, 4), THINGS)


# --------------------------------------------------------------------------------------
# fuse_panoptic: classes 0, 1 stuff; 2, 3 things; a 4 x 8 image
# --------------------------------------------------------------------------------------

FUSE_THINGS = [2, 3]


def _scene():
    semantic = np.zeros((4, 8), dtype=np.int64)
    semantic[:, 4:6] = 2
    semantic[:2, 6:] = 1
    semantic[2:, 6:] = 3
    boxes = {  # label, score, (rows, cols)
        "A": (2, 0.9, (slice(None), slice(4, 6))),   # 8 px
        "B": (2, 0.8, (slice(None), slice(3, 6))),   # 12 px, 4 of them free after A
        "C": (3, 0.7, (slice(None), slice(5, 7))),   # 8 px, 4 free after A: exactly half
        "D": (3, 0.3, (slice(None), slice(7, 8))),   # below the score threshold
        "E": (1, 0.95, (slice(None), slice(0, 2))),  # a stuff label: not an instance
        "F": (2, 0.6, (slice(0, 0), slice(0, 0))),   # empty mask
    }
    masks = np.zeros((len(boxes), 4, 8), dtype=bool)
    for i, (_, _, (rows, cols)) in enumerate(boxes.values()):
        masks[i, rows, cols] = True
    labels = [b[0] for b in boxes.values()]
    scores = [b[1] for b in boxes.values()]
    return semantic, labels, scores, masks


def test_fuse_places_things_by_score_then_stuff_in_the_rest():
    semantic, labels, scores, masks = _scene()
    seg, info = fuse_panoptic(semantic, labels, scores, masks, FUSE_THINGS, FusionParams(stuff_min_area=5))
    # A (id 1) cols 4-5; B dropped (4 / 12 free < 0.5); C (id 2) keeps col 6 (4 / 8 = 0.5);
    # stuff 0 (id 3) cols 0-3; stuff 1 has 2 px left (col 7 rows 0-1) < 5: void; the thing
    # class 3 pixels of the semantic map at col 7 rows 2-3 have no instance: void.
    np.testing.assert_array_equal(seg, [[3, 3, 3, 3, 1, 1, 2, 0]] * 4)
    assert [(s["id"], s["category_id"], s["isthing"], s["area"], s["score"]) for s in info] == [
        (1, 2, True, 8, 0.9), (2, 3, True, 4, 0.7), (3, 0, False, 16, None)]
    assert info[1]["bbox"] == [6.0, 0.0, 1.0, 4.0]


def test_fuse_thresholds_are_keyword_arguments():
    semantic, labels, scores, masks = _scene()
    seg, info = fuse_panoptic(torch.as_tensor(semantic), torch.tensor(labels), torch.tensor(scores),
                              torch.as_tensor(masks), FUSE_THINGS, FusionParams(overlap_threshold=0.3, stuff_min_area=2))
    # B now kept on col 3 (4 / 12 >= 0.3); stuff 1's 2 px reach the minimum area.
    np.testing.assert_array_equal(seg, [[4, 4, 4, 2, 1, 1, 3, 5]] * 2 + [[4, 4, 4, 2, 1, 1, 3, 0]] * 2)
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 2, 8), (2, 2, 4), (3, 3, 4), (4, 0, 12), (5, 1, 2)]
    # A lower score threshold admits D (0.3), which takes col 7 before stuff 1 could.
    seg, info = fuse_panoptic(semantic, labels, scores, masks, FUSE_THINGS, FusionParams(score_threshold=0.2, stuff_min_area=5))
    np.testing.assert_array_equal(seg, [[4, 4, 4, 4, 1, 1, 2, 3]] * 4)
    assert [(s["id"], s["category_id"], s["score"]) for s in info] == [(1, 2, 0.9), (2, 3, 0.7), (3, 3, 0.3), (4, 0, None)]


def test_fuse_ties_keep_input_order_and_label_divisor():
    semantic = np.zeros((2, 4), dtype=np.int64)
    masks = np.zeros((2, 2, 4), dtype=bool)
    masks[0, :, 0:3] = True
    masks[1, :, 1:4] = True  # equal score: the first instance is placed first, the second
    seg, info = fuse_panoptic(semantic, [2, 2], [0.9, 0.9], masks, FUSE_THINGS, FusionParams(stuff_min_area=1, overlap_threshold=0.3), label_divisor=100)
    np.testing.assert_array_equal(seg, [[201, 201, 201, 202]] * 2)  # keeps 2 of 6 px (>= 0.3)
    assert [s["id"] for s in info] == [201, 202]


def test_fuse_rejects_probabilities_and_mismatched_shapes():
    semantic, labels, scores, masks = _scene()
    with pytest.raises(ValueError, match="binary"):
        fuse_panoptic(semantic, labels, scores, masks.astype(np.float32), FUSE_THINGS)
    with pytest.raises(ValueError, match="instance masks are"):
        fuse_panoptic(semantic[:, :4], labels, scores, masks, FUSE_THINGS)
    with pytest.raises(ValueError, match="6 instance labels, 5 scores"):
        fuse_panoptic(semantic, labels, scores[:5], masks, FUSE_THINGS)


def test_outputs_are_valid_coco_panoptic_for_the_metric():
    semantic, labels, scores, masks = _scene()
    seg, info = fuse_panoptic(semantic, labels, scores, masks, FUSE_THINGS, FusionParams(stuff_min_area=5))
    stat = PQStat([0, 1, 2, 3])
    stat.update(seg, info, seg, info)
    m = stat.compute(["soil", "gravel", "machine", "worker"], [False, False, True, True])
    assert (m["pq"], m["pq_things"], m["pq_stuff"]) == (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------------------
# ground_truth: classes 0, 1 stuff; 2, 3 things; ignore 255; a 4 x 6 image
# --------------------------------------------------------------------------------------


def _gt_case():
    from segpipe.panoptic import ground_truth

    sem = np.array([
        [0, 0, 2, 2, 1, 1],
        [0, 0, 2, 2, 1, 1],
        [0, 255, 3, 3, 3, 1],
        [0, 0, 2, 2, 3, 1],
    ])
    a = np.zeros((4, 6), bool)
    a[0:2, 2:4] = True                       # thing 2, 4 px
    crowd = np.zeros((4, 6), bool)
    crowd[2, 2:5] = True                     # crowd of thing 3, 3 px
    crowd[3, 4] = True
    covered = np.zeros((4, 6), bool)
    covered[0, 2] = True                     # wholly under the later instance `a2`: dropped
    a2 = np.zeros((4, 6), bool)
    a2[0, 2:4] = True                        # thing 2, takes row 0 from `a`
    masks, labels, flags = [covered, a, crowd, a2], [2, 2, 3, 2], [0, 0, 1, 0]
    return ground_truth(sem, masks, labels, flags, [2, 3], 255), sem


def test_ground_truth_segments_stuff_things_crowd_and_void():
    (seg_map, info), sem = _gt_case()
    by_id = {s["id"]: s for s in info}
    assert [(s["category_id"], s["iscrowd"], s["isthing"], s["area"]) for s in info] == [
        (2, 0, True, 2),   # `a` keeps row 1 only
        (3, 1, True, 4),   # the crowd region
        (2, 0, True, 2),   # `a2`, later, takes row 0
        (0, 0, False, 7),  # stuff 0 without its ignored pixel
        (1, 0, False, 6),
    ]
    assert [s["id"] for s in info] == [1, 2, 3, 4, 5]
    assert seg_map[2, 1] == 0                       # ignore_index is void
    assert (seg_map[3, 2:4] == 0).all()             # thing pixels no instance covers are void
    assert (seg_map[0, 2:4] == 3).all() and (seg_map[1, 2:4] == 1).all()
    assert set(np.unique(seg_map)) == {0, *by_id}
    for s in info:
        assert s["area"] == int((seg_map == s["id"]).sum())


def test_ground_truth_scores_itself_perfectly_and_crowd_is_never_matched():
    (seg_map, info), _ = _gt_case()
    stat = PQStat([0, 1, 2, 3])
    stat.update(seg_map, info, seg_map, info)
    r = stat.compute(["a", "b", "c", "d"], [False, False, True, True])
    assert r["pq"] == 1.0 and r["per_class"]["d"]["tp"] == 0 and r["per_class"]["d"]["fp"] == 0


def test_ground_truth_errors_name_the_image():
    from segpipe.panoptic import ground_truth

    sem = np.zeros((2, 2), int)
    with pytest.raises(ValueError, match="image x: instance #0 has category 1, not a thing class"):
        ground_truth(sem, [np.ones((2, 2), bool)], [1], [0], [2], 255, where="image x")
    with pytest.raises(ValueError, match="instance #0 has a \\(3, 2\\) mask"):
        ground_truth(sem, [np.ones((3, 2), bool)], [2], [0], [2], 255)


def test_sample_ground_truth_decodes_shard_rles():
    from pycocotools import mask as mask_utils

    from segpipe.panoptic import sample_ground_truth

    sem = np.zeros((5, 4), np.uint8)
    sem[1:3, 1:3] = 2
    m = np.zeros((5, 4), np.uint8, order="F")
    m[1:3, 1:3] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    sample = {"image_id": "s", "semantic": sem,
              "instances": [{"category_id": 2, "iscrowd": 0, "segmentation": {"size": [5, 4], "counts": rle["counts"].decode()}}]}
    seg_map, info = sample_ground_truth(sample, [2], 255)
    assert [(s["category_id"], s["area"]) for s in info] == [(2, 4), (0, 16)]
    assert (seg_map[1:3, 1:3] == 1).all()

import numpy as np
import pytest
import torch

from segpipe.data import (
    MAX_INSTANCES,
    AugmentConfig,
    augment,
    center_crop,
    collate_targets,
    instance_map_from_masks,
    masks_to_boxes,
    pack_instances,
    photometric,
)


def scene(h=40, w=60):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w, dtype=np.uint8)[None] * 4
    sem = np.zeros((h, w), np.uint8)
    sem[5:15, 10:30] = 5
    sem[20:35, 40:55] = 7
    sem[0, :] = 255
    inst = np.zeros((h, w), np.int16)
    inst[5:15, 10:30] = 1
    inst[20:35, 40:55] = 2
    return img, sem, inst


def test_instance_map_later_masks_occlude():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    m = instance_map_from_masks([a, b], (4, 4))
    assert m[0, 0] == 1 and m[1, 0] == 2 and m[2, 0] == 2 and m[3, 0] == 0


def test_augment_keeps_labels_aligned_with_image():
    img, sem, inst = scene()
    # encode the label into the image so misalignment is detectable after any crop/flip/scale
    img = np.stack([sem * 10, sem * 10, sem * 10], -1).astype(np.uint8)
    cfg = AugmentConfig(size=32, scale_range=(0.8, 1.5), photometric=0.0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        a_img, a_sem, a_inst = augment(img, sem, inst, cfg, rng)
        assert a_img.shape == (32, 32, 3) and a_sem.shape == (32, 32) and a_inst.shape == (32, 32)
        labelled = (a_sem != 255)
        # nearest-resized labels agree with the bilinear image except on edges
        agree = (a_img[..., 0][labelled] == a_sem[labelled] * 10).mean()
        assert agree > 0.8
        # instance 1 pixels are class 5, instance 2 pixels class 7
        assert set(np.unique(a_sem[a_inst == 1])) <= {5}
        assert set(np.unique(a_sem[a_inst == 2])) <= {7}


def test_augment_pads_small_images_with_ignore():
    img, sem, inst = scene(10, 10)
    cfg = AugmentConfig(size=64, scale_range=(2.0, 2.0), photometric=0.0, hflip=False)
    _, a_sem, a_inst = augment(img, sem, inst, cfg, np.random.default_rng(0))
    assert (a_sem == 255).sum() > 0 and a_sem.shape == (64, 64)


def test_center_crop_native_scale_and_padding():
    img, sem, inst = scene()
    c_img, c_sem, c_inst = center_crop(img, sem, inst, 20)
    assert c_sem.shape == (20, 20) and np.array_equal(c_sem, sem[10:30, 20:40])
    p_img, p_sem, _ = center_crop(img, sem, inst, 64)
    assert p_sem.shape == (64, 64) and (p_sem[40:] == 255).all() and np.array_equal(p_sem[:40, :60], sem)


def test_photometric_changes_values_within_range():
    img, _, _ = scene()
    out = photometric(img, 0.3, np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img)


def test_pack_instances_pads_and_truncates_keeping_largest():
    labels = np.arange(MAX_INSTANCES + 3, dtype=np.int32)
    crowd = np.zeros_like(labels, dtype=np.uint8)
    inst = np.zeros((30, 100), np.int16)
    # instance i+1 has area i+1 -> the three smallest (ids 1..3) are dropped
    col = 0
    for i in range(len(labels)):
        inst.flat[col : col + i + 1] = i + 1
        col += i + 1
    out_l, out_c, out_m = pack_instances(labels, crowd, inst)
    assert out_l.shape == (MAX_INSTANCES,) and out_l[0] == 3 and out_l[-1] == MAX_INSTANCES + 2
    assert out_m.max() == MAX_INSTANCES and (out_m == 1).sum() == 4
    few_l, _, few_m = pack_instances(labels[:2], crowd[:2], np.minimum(inst, 2))
    assert list(few_l[:3]) == [0, 1, -1]


def test_masks_to_boxes_pixel_edges():
    m = torch.zeros(2, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    m[1, 0, 0] = True
    assert masks_to_boxes(m).tolist() == [[3, 2, 7, 5], [0, 0, 1, 1]]
    assert masks_to_boxes(m[:0]).shape == (0, 4)


def test_collate_targets_builds_model_targets():
    img, sem, inst = scene()
    labels, crowd, inst = pack_instances(np.array([5, 7], np.int32), np.array([0, 1], np.uint8), inst)
    batch = {"image": img[None], "semantic": sem[None], "instance_map": inst[None],
             "instance_label": labels[None], "instance_crowd": crowd[None]}
    images, targets = collate_targets(batch)
    assert images.shape == (1, 3, 40, 60) and images.dtype == torch.float32
    t = targets[0]
    assert t["labels"].tolist() == [5, 7] and t["iscrowd"].tolist() == [0, 1]
    assert t["masks"].shape == (2, 40, 60) and t["semantic"].dtype == torch.int64
    assert t["boxes"][0].tolist() == [10, 5, 30, 15]


@pytest.mark.parametrize("bad", [0.0, 0.05])
def test_collate_drops_tiny_instances(bad):
    inst = np.zeros((1, 16, 16), np.int16)
    inst[0, 0, 0] = 1  # a 1-pixel sliver
    inst[0, 4:10, 4:10] = 2
    labels = np.full((1, MAX_INSTANCES), -1, np.int32)
    labels[0, :2] = [6, 8]
    batch = {"image": np.zeros((1, 16, 16, 3), np.uint8), "semantic": np.zeros((1, 16, 16), np.uint8),
             "instance_map": inst, "instance_label": labels, "instance_crowd": np.zeros((1, MAX_INSTANCES), np.uint8)}
    _, targets = collate_targets(batch)
    assert targets[0]["labels"].tolist() == [8]


def test_prepared_batches_have_fixed_dtypes_whether_resized_or_not(tiny_shards):
    import pyarrow.parquet as pq

    from segpipe.data import prepare_rows
    from segpipe.shards import shard_files

    rows = pq.read_table(shard_files(tiny_shards, "train")[0]).to_pylist()[:2]
    same = prepare_rows(rows, AugmentConfig(size=32, scale_range=(1.0, 1.0)), True, np.random.default_rng(0))
    scaled = prepare_rows(rows, AugmentConfig(size=32, scale_range=(1.5, 1.5)), True, np.random.default_rng(0))
    val = prepare_rows(rows, AugmentConfig(size=32), False, np.random.default_rng(0))
    for batch in (same, scaled, val):
        assert {k: v.dtype for k, v in batch.items()} == {
            "image": np.uint8, "semantic": np.uint8, "instance_map": np.int16,
            "instance_label": np.int32, "instance_crowd": np.uint8}


@pytest.mark.slow
def test_cached_train_dataset_reads_the_shards_once(ray_session, tiny_shards, tmp_path):
    """With cache the encoded rows live in Ray's object store: epochs after the first need no
    Parquet file (nor do tables the caller read already); without it every epoch re-reads them."""
    import shutil

    from segpipe.data import AugmentConfig, build_train_dataset
    from segpipe.shards import open_shards, read_shard

    cfg = AugmentConfig(size=32)
    for cache, given in ((True, False), (True, True), (False, False)):
        shards = tmp_path / f"shards-{cache}-{given}"
        shutil.copytree(tiny_shards, shards)
        shard_set = open_shards(shards)
        tables = [read_shard(shard_set, f) for f in shard_set.files_of("train")] if given else None
        ds = build_train_dataset(shard_set, cfg, batch_size=4, cache=cache, tables=tables)
        shutil.rmtree(shards / "train")
        if cache:
            batches = list(ds.iter_batches(batch_size=4))
            assert sum(len(b["image"]) for b in batches) == shard_set.rows("train")
            assert batches[0]["image"].shape[1:] == (32, 32, 3)
        else:
            with pytest.raises(Exception, match="shard listed in the manifest is missing"):
                list(ds.iter_batches(batch_size=4))


def test_a_synthetic_batch_is_a_prepared_batch_with_every_class_and_one_thing_per_image():
    from segpipe.data import MAX_INSTANCES, collate_targets, synthetic_batch

    b = synthetic_batch(3, 32, num_classes=5, thing_ids=[3, 4], ignore_index=255, seed=1)
    assert b["image"].shape == (3, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["semantic"].dtype == np.uint8 and set(np.unique(b["semantic"])) == {0, 1, 2, 3, 4, 255}
    assert b["instance_label"].shape == (3, MAX_INSTANCES) and b["instance_label"][:, 0].tolist() == [3, 4, 3]
    assert (b["instance_label"][:, 1:] == -1).all() and b["instance_map"].max() == 1
    images, targets = collate_targets(b)
    assert images.shape == (3, 3, 32, 32) and [len(t["labels"]) for t in targets] == [1, 1, 1]
    assert all(int(t["masks"].sum()) == 16 * 16 for t in targets)  # a size/2 square each
    assert np.array_equal(synthetic_batch(3, 32, 5, [3, 4], seed=1)["image"], b["image"])  # seeded

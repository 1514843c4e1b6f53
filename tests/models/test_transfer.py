"""Fine-tuning across class tables (segpipe.models.transfer), over every architecture in the registry."""

from __future__ import annotations

import re

import pytest
import torch

from segpipe.models import MODELS, ClassRows, TransferError, adapt_state_dict, build_model, normalize, spec_of

# Small configurations, so that every architecture builds in well under a second. deeplabv3 has its
# auxiliary head, so that its class rows are exercised too; maskformer's things exist in every table.
SMALL = {
    "fcn32s": {"head_channels": 16},
    "fcn16s": {"head_channels": 16},
    "fcn8s": {"head_channels": 16},
    "unet": {"base_channels": 4, "depth": 2},
    "deeplabv3": {"aspp_channels": 16, "aux_loss": True},
    "maskformer": {"hidden_dim": 32, "conv_dim": 16, "mask_dim": 16, "num_queries": 8, "dec_layers": 1,
                   "dim_feedforward": 32, "thing_ids": [1, 2]},
    "mask_rcnn": {"min_size": 64, "max_size": 64, "fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 8},
}
# A width that is not a class axis: a parent with another value cannot initialise the target.
WIDTH = {"fcn32s": "head_channels", "fcn16s": "head_channels", "fcn8s": "head_channels", "unet": "base_channels",
         "deeplabv3": "aspp_channels", "maskformer": "hidden_dim", "mask_rcnn": "fpn_channels"}

# id 2 is a gap in the parent: 4 rows
PARENT_CLASSES = [{"id": 0, "name": "ground"}, {"id": 1, "name": "crane"}, {"id": 3, "name": "helmet"},
                  {"id": 4, "name": "worker", "isthing": True}]
# worker 4 -> 1, crane 1 -> 4, excavator new at 2, helmet dropped (its old id 3 is now a gap), ground stays 0
TARGET_CLASSES = [{"id": 0, "name": "ground"}, {"id": 1, "name": "worker", "isthing": True},
                  {"id": 2, "name": "excavator"}, {"id": 4, "name": "crane"}]
KEPT = {"ground": (0, 0), "worker": (4, 1), "crane": (1, 4)}  # name: (parent id, target id)
FRESH_IDS = [2, 3]  # excavator (new), and the gap where the parent's helmet was


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, num_classes: int, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes, **{**SMALL[name], **kwargs})


def trained(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with every float tensor moved, as training would, so that no parent row
    equals a fresh one by chance (FCN's upsamplers start bilinear, its skip scores at zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        moved = v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        out[k] = moved.abs() if k.endswith("running_var") else moved
    return out


def layout_of(name: str, key: str) -> ClassRows | None:
    found = [r for r in spec_of(name).class_rows if re.fullmatch(r.pattern, key)]
    assert len(found) <= 1, (key, found)
    return found[0] if found else None


def rows(layout: ClassRows, ids: list[int], num_classes: int, extra: bool = False) -> torch.Tensor:
    """Indices along a class dim of the classes ``ids`` (and, with ``extra``, of the lead and trail rows)."""
    out = list(range(layout.lead)) if extra else []
    for i in ids:
        out.extend(range(layout.lead + i * layout.block, layout.lead + (i + 1) * layout.block))
    if extra:
        end = layout.lead + num_classes * layout.block
        out.extend(range(end, end + layout.trail))
    return torch.tensor(out, dtype=torch.long)


def select(t: torch.Tensor, dims: tuple[int, ...], index: torch.Tensor) -> torch.Tensor:
    for d in dims:
        t = t.index_select(d, index)
    return t


@pytest.mark.parametrize("name", MODELS)
def test_same_class_table_gives_the_parent_state(name):
    parent = trained(build(name, 5, seed=0), seed=1)
    fresh = build(name, 5, seed=2).state_dict()
    state, report = adapt_state_dict(name, parent, PARENT_CLASSES, fresh, PARENT_CLASSES)
    assert state.keys() == fresh.keys()
    assert all(torch.equal(state[k], parent[k]) for k in parent)
    assert [(c.name, c.parent_id, c.target_id) for c in report.kept] == [
        ("ground", 0, 0), ("crane", 1, 1), ("helmet", 3, 3), ("worker", 4, 4)]
    assert report.added == () and report.dropped == ()
    declared = [k for k in fresh if layout_of(name, k)]
    assert declared and report.remapped == len(declared) and report.copied == len(fresh) - len(declared)


@pytest.mark.parametrize("name", MODELS)
def test_classes_matched_by_name_added_and_dropped(name):
    parent_model = build(name, 5, seed=0)
    parent = trained(parent_model, seed=1)
    model = build(name, 5, seed=2)  # 5 target rows too, but other classes at other ids
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    state, report = adapt_state_dict(name, parent, PARENT_CLASSES, fresh, TARGET_CLASSES)

    assert {c.name: (c.parent_id, c.target_id) for c in report.kept} == KEPT
    assert [(c.name, c.id) for c in report.added] == [("excavator", 2)]
    assert [(c.name, c.id) for c in report.dropped] == [("helmet", 3)]
    assert report.to_dict()["dropped"] == [{"name": "helmet", "id": 3}]
    remapped = 0
    for key, new in state.items():
        layout = layout_of(name, key)
        if layout is None:
            assert torch.equal(new, parent[key]), key
            continue
        remapped += 1
        p_ids, t_ids = zip(*KEPT.values())
        kept_parent = select(parent[key], layout.dims, rows(layout, list(p_ids), 5, extra=True))
        kept_target = select(new, layout.dims, rows(layout, list(t_ids), 5, extra=True))
        assert torch.equal(kept_target, kept_parent), key
        for d in layout.dims:  # a row or column of a new class is the fresh one, whatever the other dims
            fresh_rows = rows(layout, FRESH_IDS, 5)
            assert torch.equal(new.index_select(d, fresh_rows), fresh[key].index_select(d, fresh_rows)), key
            assert not torch.equal(new.index_select(d, fresh_rows), parent[key].index_select(d, fresh_rows)), key
    assert remapped == report.remapped > 0

    model.load_state_dict(state, strict=True)
    model.eval()
    images = normalize(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8))
    with torch.no_grad():
        out = model(images)
    if spec_of(name).task == "semantic":
        assert out.shape == (1, 5, 64, 64) and torch.isfinite(out).all()
    else:
        assert len(out) == 1 and set(out[0]) == {"boxes", "labels", "scores", "masks"}
        assert all(0 <= label < 5 for label in out[0]["labels"].tolist())


@pytest.mark.parametrize("name", MODELS)
def test_a_target_with_fewer_class_ids_loads(name):
    """Dropping the classes with the highest ids shrinks the class axis: 5 rows -> 2."""
    parent = trained(build(name, 5, seed=0), seed=1)
    model = build(name, 3 if name == "maskformer" else 2, seed=2)  # maskformer's thing ids are 1 and 2
    target = [{"id": 0, "name": "crane"}, {"id": 1, "name": "ground"}]
    if name == "maskformer":
        target.append({"id": 2, "name": "worker"})
    state, report = adapt_state_dict(name, parent, PARENT_CLASSES, model.state_dict(), target)
    model.load_state_dict(state, strict=True)
    assert [c.name for c in report.dropped] == ["helmet"] + (["worker"] if name != "maskformer" else [])
    key = next(k for k in state if layout_of(name, k))
    layout = layout_of(name, key)
    assert torch.equal(select(state[key], layout.dims, rows(layout, [0, 1], 2)),
                       select(parent[key], layout.dims, rows(layout, [1, 0], 5)))


@pytest.mark.parametrize("name", MODELS)
def test_another_width_is_an_error_naming_the_key(name):
    width = WIDTH[name]
    parent = build(name, 5, seed=0, **{width: 2 * SMALL[name][width]}).state_dict()
    target = build(name, 5, seed=0).state_dict()
    differing = [k for k in target if parent[k].shape != target[k].shape]
    assert differing
    with pytest.raises(TransferError) as e:
        adapt_state_dict(name, parent, PARENT_CLASSES, target, PARENT_CLASSES)
    key = str(e.value).split(":")[0]
    assert key in differing
    assert f"parent shape {tuple(parent[key].shape)} != target shape {tuple(target[key].shape)}" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_keys_in_one_state_only_unknown_arch_and_bad_tables():
    with_aux = build("deeplabv3", 5, seed=0).state_dict()
    without = build("deeplabv3", 5, seed=0, aux_loss=False).state_dict()
    with pytest.raises(TransferError, match=r"not in the target model: aux_head\.0\.0\.weight"):
        adapt_state_dict("deeplabv3", with_aux, PARENT_CLASSES, without, PARENT_CLASSES)
    with pytest.raises(TransferError, match=r"missing from the parent: aux_head\.0\.0\.weight"):
        adapt_state_dict("deeplabv3", without, PARENT_CLASSES, with_aux, PARENT_CLASSES)
    with pytest.raises(TransferError, match="unknown model 'segformer'; valid names: fcn32s"):
        adapt_state_dict("segformer", with_aux, PARENT_CLASSES, with_aux, PARENT_CLASSES)
    twice = [*PARENT_CLASSES, {"id": 7, "name": "crane"}]
    with pytest.raises(TransferError, match="target classes: name 'crane' is given twice"):
        adapt_state_dict("deeplabv3", with_aux, PARENT_CLASSES, with_aux, twice)
    with pytest.raises(TransferError, match=r"parent classes\[1\]: id must be a non-negative integer, got '1'"):
        adapt_state_dict("deeplabv3", with_aux, [{"id": 0, "name": "a"}, {"id": "1", "name": "b"}],
                         with_aux, PARENT_CLASSES)
    # a class table that does not describe the parent's weights (7 ids, 5 rows)
    with pytest.raises(TransferError, match=r"head\.1\.weight: parent shape \(5, 16, 1, 1\).*7 parent"):
        adapt_state_dict("deeplabv3", with_aux, [*PARENT_CLASSES, {"id": 6, "name": "fence"}], with_aux,
                         PARENT_CLASSES)


@pytest.mark.parametrize("name", MODELS)
def test_every_class_sized_tensor_is_declared(name):
    """Built for 3 and for 6 classes, exactly the tensors of the spec's class_rows change shape,
    along exactly their declared dims and by their declared layout; each pattern matches a tensor."""
    small, large = build(name, 3, seed=0).state_dict(), build(name, 6, seed=0).state_dict()
    assert small.keys() == large.keys()
    used = set()
    for key in small:
        a, b = tuple(small[key].shape), tuple(large[key].shape)
        layout = layout_of(name, key)
        if a == b:
            assert layout is None, f"{key} {a} is declared class-indexed but does not depend on the classes"
            continue
        assert layout is not None, f"{key} changes shape with the classes ({a} -> {b}) but no ClassRows declares it"
        used.add(layout.pattern)
        assert {d for d in range(len(a)) if a[d] != b[d]} == set(layout.dims), key
        assert all(a[d] == layout.size(3) and b[d] == layout.size(6) for d in layout.dims), key
    assert used == {r.pattern for r in spec_of(name).class_rows}


def test_class_rows_reject_bad_layouts():
    with pytest.raises(ValueError, match="dims must be distinct"):
        ClassRows("x", dims=(0, 0))
    with pytest.raises(ValueError, match="block >= 1"):
        ClassRows("x", block=0)
    assert ClassRows("a\\.b", lead=1, block=4, trail=2).size(3) == 15


@pytest.mark.parametrize("name", ["unet", "fcn8s"])
def test_no_shared_class_keeps_every_fresh_row(name):
    parent = trained(build(name, 5, seed=0), seed=1)
    fresh = build(name, 3, seed=2).state_dict()
    target = [{"id": 0, "name": "fence"}, {"id": 1, "name": "scaffold"}, {"id": 2, "name": "pipe"}]
    state, report = adapt_state_dict(name, parent, PARENT_CLASSES, fresh, target)
    assert report.kept == () and len(report.added) == 3 and len(report.dropped) == 4
    for key, value in state.items():
        assert torch.equal(value, fresh[key] if layout_of(name, key) else parent[key]), key

"""``segpipe export``: a registered model to ONNX or TorchScript, with a parity check.

Input of every exported model: images normalised by ``segpipe.models.normalize``, float32.

* Semantic models (fcn*, unet, deeplabv3, maskformer): input ``images`` ``B x 3 x H x W``,
  output ``logits`` ``B x K x H x W``; the batch, height and width axes are dynamic.
* Models with a panoptic output (maskformer) also output their raw mask classification,
  ``class_logits`` ``B x Q x K+1`` and ``mask_logits`` ``B x Q x H x W`` (what
  ``mask_classification`` returns); panoptic post-processing stays in Python
  (``segpipe.panoptic.maskformer_panoptic`` on those two outputs), and parity covers all three.
  ONNX uses the TorchScript-based exporter (``dynamo=False``), falling back to the dynamo
  exporter if it fails; TorchScript uses tracing.
* Mask R-CNN, TorchScript: ``torch.jit.script`` of the torchvision detector; it takes a list of
  ``3 x H x W`` images and returns ``(losses, detections)``.
* Mask R-CNN, ONNX: torchvision's detector traces to a graph of ONE image (no batch axis), so
  the input is ``image`` ``3 x H x W`` (height and width dynamic) and the outputs are
  ``boxes`` ``N x 4``, ``labels`` ``N``, ``scores`` ``N``, ``masks`` ``N x 1 x H x W`` (N
  dynamic, possibly 0); batches run image by image. With ``native_scale=True`` (the default)
  both formats work at the image's own scale, like the PyTorch model: its transform never
  resizes (``segpipe.models.native_scale``). Only the TorchScript-based
  exporter is tried: torchvision's ONNX code paths (``torchvision._is_tracing()``) are written
  for it.

Both Mask R-CNN formats return torchvision labels, i.e. segpipe class id + 1.

Parity: the exported model and PyTorch are run on seeded sample images at batch size 1, at a
second batch size and at a non-square size, and, for Mask R-CNN, on a blank image with the
score threshold above 1, so that both must return zero detections; the max absolute
difference of every output must stay under ``--tolerance``, else the command exits non-zero
and removes nothing but reports the differences.

A Mask R-CNN that detects nothing on a sample at its own score threshold (counted by
``segpipe.inference``'s selection, as served) would pass by comparing empty outputs. Such a
sample is compared with the threshold lowered to 0 instead, on a graph built for the check (the
shipped file keeps its threshold); its row says so (``score_threshold``) and so does the
report's ``note``. A sample without detections even then fails: there is nothing to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segpipe.errors import UserError
from segpipe.files import atomic_path, atomic_write_json
from segpipe.registry import DEFAULT_REGISTRY, load

FORMATS = ("onnx", "torchscript")
OPSET = 17
DETECTION_OUTPUTS = ("boxes", "labels", "scores", "masks")
# Scores are softmax probabilities: above 1 no detection can pass, whatever the image.
NO_DETECTIONS_SCORE_THRESH = 1.01
# torchvision keeps scores above its threshold: at 0, every detection the heads produce.
CHECK_SCORE_THRESH = 0.0


class ExportError(UserError, RuntimeError):
    """The model cannot be exported in the requested format, or the export disagrees with PyTorch."""


def sample_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Seeded smooth random images, normalised like real inputs."""
    from segpipe.models import normalize

    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((batch, 3, max(2, height // 16), max(2, width // 16)), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return normalize(smooth.clamp(0, 1), layout="bchw")


def _semantic_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, dict):
        out = out["out"]
    if isinstance(out, (list, tuple)):
        return [np.asarray(o.detach().cpu() if isinstance(o, torch.Tensor) else o) for o in out]
    return [out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)]


def _detections(out: Any) -> list[np.ndarray]:
    """Flatten detection dicts (eager/torchscript ``(losses, detections)`` or a list) in a fixed order."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
        out = out[1]
    arrays = []
    for d in out:
        for k in ("boxes", "labels", "scores", "masks"):
            arrays.append(d[k].detach().cpu().numpy().astype(np.float64))
    return arrays


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference over matching outputs; inf when shapes differ."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
    return worst


class OneImageDetector(torch.nn.Module):
    """A torchvision detector on one ``3 x H x W`` image, returning a tuple of
    ``DETECTION_OUTPUTS`` (ONNX outputs cannot be a list of dicts). segpipe's MaskRCNN keeps
    images at their own scale with a transform that never resizes (NativeScaleTransform), so
    the traced graph works at any height and width, as the PyTorch model does."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        detections = self.detector([image])[0]
        return tuple(detections[k] for k in DETECTION_OUTPUTS)


class MaskClassificationOutputs(torch.nn.Module):
    """A model with a panoptic output as one graph of ``(logits, class_logits, mask_logits)``:
    the semantic scores and the raw outputs ``segpipe.panoptic.maskformer_panoptic`` reads, from
    one forward pass."""

    OUTPUT_NAMES = ("logits", "class_logits", "mask_logits")

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        class_logits, mask_logits = self.model.mask_classification(images)  # masks already at input size
        return self.model.semantic_scores(class_logits, mask_logits, images.shape[-2:]), class_logits, mask_logits


def exportable(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """What is exported of ``model``: itself, or with its raw mask classification outputs too."""
    from segpipe.models import spec_of

    return MaskClassificationOutputs(model).eval() if "panoptic" in spec_of(arch).outputs else model


def export_torchscript(model: torch.nn.Module, task: str, example: torch.Tensor, out: Path) -> Path:
    with atomic_path(out) as tmp, torch.no_grad():
        if task == "instance":
            scripted = torch.jit.script(model.detector)
        else:
            scripted = torch.jit.trace(model, example, check_trace=False, strict=False)
        torch.jit.save(scripted, str(tmp))
    return out


def export_detector_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    """Write Mask R-CNN's one-image ONNX graph (TorchScript-based exporter), traced on ``example``
    (``3 x H x W``); the detector is copied with its current settings (e.g. score threshold)."""
    module = OneImageDetector(model.detector).eval()
    detections = {k: {0: "detections"} for k in DETECTION_OUTPUTS}
    with atomic_path(out) as tmp, torch.no_grad():
        torch.onnx.export(
            module, (example,), str(tmp), dynamo=False, opset_version=OPSET, input_names=["image"],
            output_names=list(DETECTION_OUTPUTS), dynamic_axes={"image": {1: "height", 2: "width"}, **detections},
        )


def export_onnx(model: torch.nn.Module, task: str, example: torch.Tensor, out: Path, dynamo: bool) -> None:
    """Write ONNX with the TorchScript-based (``dynamo=False``) or the dynamo exporter."""
    if task == "instance":
        if dynamo:
            raise ExportError("mask_rcnn: ONNX export uses the TorchScript-based exporter only")
        export_detector_onnx(model, example[0], out)
        return
    names = list(getattr(model, "OUTPUT_NAMES", ("logits",)))
    kwargs: dict[str, Any] = {"dynamo": dynamo, "input_names": ["images"], "output_names": names,
                              "opset_version": OPSET}
    if dynamo:
        batch, h, w = (torch.export.Dim(n) for n in ("batch", "height", "width"))
        kwargs["dynamic_shapes"] = {"images": {0: batch, 2: h, 3: w}}
    else:
        kwargs["dynamic_axes"] = {"images": {0: "batch", 2: "height", 3: "width"},
                                  **{n: {0: "batch"} if n == "class_logits" else {0: "batch", 2: "height", 3: "width"}
                                     for n in names}}
    # The fused inference path of nn.MultiheadAttention (maskformer) has no ONNX symbolic.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with atomic_path(out) as tmp, torch.no_grad():
            torch.onnx.export(model, (example,), str(tmp), **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def runner(path: Path, fmt: str, task: str) -> Any:
    """A callable running the exported file on a B x 3 x H x W tensor, returning list of arrays."""
    if fmt == "torchscript":
        import torchvision  # noqa: F401 - registers torchvision::nms etc. that a scripted detector calls

        module = torch.jit.load(str(path)).eval()

        def run_ts(x: torch.Tensor) -> list[np.ndarray]:
            with torch.no_grad():
                if task == "instance":
                    return _detections(module(list(x)))
                return _semantic_outputs(module(x))

        run_ts.module = module  # type: ignore[attr-defined]
        return run_ts
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run_onnx(x: torch.Tensor) -> list[np.ndarray]:
        if task == "instance":  # the graph takes one image: batches run image by image
            outs = [session.run(list(DETECTION_OUTPUTS), {"image": image.numpy()}) for image in x]
            return _detections([dict(zip(DETECTION_OUTPUTS, map(torch.from_numpy, o))) for o in outs])
        return [np.asarray(o) for o in session.run(None, {"images": x.numpy()})]

    return run_onnx


def reference(model: torch.nn.Module, task: str) -> Any:
    def run_torch(x: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            if task == "instance":
                out = model.detector(list(x))  # torchvision labels, like both exports
                return _detections(out)
            return _semantic_outputs(model(x))

    return run_torch


def served_detections(model: torch.nn.Module, x: torch.Tensor) -> int:
    """How many detections PyTorch's Mask R-CNN gives on ``x`` at its own score threshold, counted
    by ``segpipe.inference``'s selection (non-empty masks), as evaluate and predict serve them."""
    from segpipe.inference import select_detections
    from segpipe.params import DetectionParams

    heads = model.detector.roi_heads
    settings = DetectionParams(score_threshold=heads.score_thresh, max_detections=heads.detections_per_img)
    with torch.no_grad():
        raw = model.detector(list(x))
    return sum(len(select_detections(d, x.shape[-2], x.shape[-1], settings)) for d in raw)


def parity(
    model: torch.nn.Module, task: str, path: Path, fmt: str, size: int, batch_sizes: tuple[int, ...], tolerance: float
) -> list[dict[str, Any]]:
    """Compare the export with PyTorch on each sample; one row per sample with its max abs diff."""
    ours, theirs = reference(model, task), runner(path, fmt, task)
    samples = [(f"batch {b}", sample_images(b, size, size, seed=b)) for b in batch_sizes]
    # A non-square size checks the dynamic height/width axes too.
    samples.append((f"batch 1, {size} x {size + 32}", sample_images(1, size, size + 32, seed=7)))
    if task == "instance":
        from segpipe.models import normalize

        blank = normalize(torch.zeros(1, 3, size, size), layout="bchw")
        samples.append(("blank image", blank))
    rows = []
    for name, x in samples:
        row: dict[str, Any] = {"sample": name, "shape": list(x.shape)}
        try:
            if name == "blank image":
                a, b = _at_score_threshold(model, fmt, theirs, ours, x, NO_DETECTIONS_SCORE_THRESH)
            elif task == "instance" and served_detections(model, x) == 0:
                row["score_threshold"] = CHECK_SCORE_THRESH
                a, b = _at_score_threshold(model, fmt, theirs, ours, x, CHECK_SCORE_THRESH)
            else:
                a, b = ours(x), theirs(x)
            row["max_abs_diff"] = max_abs_diff(a, b)
            if task == "instance":
                row["detections"] = int(sum(boxes.shape[0] for boxes in a[0::len(DETECTION_OUTPUTS)]))
                if row["detections"] == 0 and name != "blank image":
                    row["max_abs_diff"] = float("inf")
                    row["error"] = f"no detections even at score threshold {CHECK_SCORE_THRESH}: nothing to compare"
        except Exception as e:  # noqa: BLE001 - a runtime that rejects an input is a parity failure
            row["max_abs_diff"] = float("inf")
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["passed"] = row["max_abs_diff"] <= tolerance
        rows.append(row)
    return rows


def _at_score_threshold(model: torch.nn.Module, fmt: str, theirs: Any, ours: Any, x: torch.Tensor,
                        threshold: float) -> tuple[list, list]:
    """Both runtimes on ``x`` with the detector's score threshold set to ``threshold`` (above 1:
    zero detections must come out; 0: every detection the heads produce).

    The scripted detector keeps the threshold as an attribute, set like PyTorch's. ONNX bakes it
    into the graph, so a second graph is exported from the same weights with that threshold (to a
    temporary directory, then discarded): it has the shipped graph's structure, and the shipped
    file is left as it is.
    """
    saved = model.detector.roi_heads.score_thresh
    model.detector.roi_heads.score_thresh = threshold
    try:
        if fmt == "onnx":
            with tempfile.TemporaryDirectory() as tmp:
                graph = Path(tmp) / "check.onnx"
                export_detector_onnx(model, x[0], graph)
                return ours(x), runner(graph, fmt, "instance")(x)
        module = theirs.module
        saved_module = module.roi_heads.score_thresh
        module.roi_heads.score_thresh = threshold
        try:
            return ours(x), theirs(x)
        finally:
            module.roi_heads.score_thresh = saved_module
    finally:
        model.detector.roi_heads.score_thresh = saved


def run(
    model_ref: str | Path,
    fmt: str,
    out: Path,
    registry: Path = DEFAULT_REGISTRY,
    tolerance: float = 1e-3,
    batch_sizes: tuple[int, ...] = (1, 3),
    size: int | None = None,
) -> dict[str, Any]:
    """Export and check parity; writes ``OUT`` and ``OUT.parity.json``; raises ExportError on failure."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    model, meta = load(model_ref, registry=registry)
    model = exportable(model, meta.arch)
    task = meta.task
    size = size or meta.image_size or 128
    # Batch 2: torch.export specialises dimensions of size 1, which would fix the batch axis.
    example = sample_images(2, size, size)
    out = Path(out)
    if fmt == "torchscript":
        exporter = "script" if task == "instance" else "trace"
        export_torchscript(model, task, example, out)
        rows = parity(model, task, out, fmt, size, batch_sizes, tolerance)
    else:
        # The TorchScript-based exporter first (dynamic_axes work for every semantic arch we have);
        # the dynamo exporter when it fails or its graph does not match PyTorch. Mask R-CNN: the
        # TorchScript-based one only (see the module docstring).
        errors = []
        for dynamo in (False,) if task == "instance" else (False, True):
            exporter = "dynamo" if dynamo else "torchscript"
            try:
                export_onnx(model, task, example, out, dynamo)
            except ExportError:
                raise
            except Exception as e:  # noqa: BLE001 - exporters raise many types; report them all
                errors.append(f"{exporter} exporter: {type(e).__name__}: {str(e)[:500]}")
                continue
            rows = parity(model, task, out, fmt, size, batch_sizes, tolerance)
            if all(r["passed"] for r in rows):
                break
            errors.append(f"{exporter} exporter: parity failed: {[r for r in rows if not r['passed']]}")
        else:
            raise ExportError(f"{out}: ONNX export of {meta.arch} failed:\n" + "\n".join(errors))
    report = {
        "model": str(model_ref), "arch": meta.arch, "task": task, "format": fmt, "exporter": exporter,
        "file": str(out), "tolerance": tolerance, "samples": rows, "passed": all(r["passed"] for r in rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
    }
    lowered = [r["sample"] for r in rows if "score_threshold" in r]
    if lowered:
        report["note"] = (f"no detections at the model's score threshold on {', '.join(lowered)}: compared at "
                          f"score threshold {CHECK_SCORE_THRESH} on a graph built for the check; {out} keeps the "
                          "model's threshold")
    atomic_write_json(out.with_name(out.name + ".parity.json"), report)
    if not report["passed"]:
        bad = ", ".join(f"{r['sample']}: {r['max_abs_diff']:.3g}" for r in rows if not r["passed"])
        raise ExportError(f"{out}: exported {meta.arch} differs from PyTorch beyond {tolerance} ({bad})")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segpipe export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="champion", help="champion | challenger | vN | CHECKPOINT_DIR")
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry directory (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output file (.onnx / .pt)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max abs difference allowed (default: %(default)s)")
    parser.add_argument("--size", type=int, help="sample image size (default: the checkpoint's image_size)")
    args = parser.parse_args(argv)
    try:
        report = run(args.model, args.format, args.out, args.registry, args.tolerance, size=args.size)
    except ExportError as e:
        print(f"segpipe export: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps({k: report[k] for k in ("arch", "format", "exporter", "file", "max_abs_diff", "passed", "note")
                      if k in report}))


if __name__ == "__main__":
    main()

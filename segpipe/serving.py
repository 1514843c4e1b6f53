"""Serving a model over HTTP: everything of ``segpipe serve`` except Ray Serve itself.

``segpipe.commands.serve`` wraps these pieces in a Ray Serve deployment; they are plain Python,
so each is tested without a server:

- the request: :func:`route` (method and path), :func:`response_format` (``?format=``),
  :func:`media_type` (``Content-Type``), :func:`check_length` (``Content-Length``) and
  :func:`decode` (the body: the pixel limit from the header before anything is decoded, then
  decoded as ``segpipe predict`` decodes a file). A bad request is a :class:`RequestError`
  carrying its HTTP status and a JSON body;
- the model: :func:`locate` reads what ``--model`` names in the registry now (version, sha256,
  folder, expected file hashes), :func:`load` verifies the files' sha256 and builds the
  predictor that ``segpipe predict`` would (``segpipe.commands.predict.model_plan`` and
  ``ImagePredictor``), so a served label PNG is byte for byte the one predict writes;
  :class:`Follower` keeps the model an alias names loaded: one registry read per
  :meth:`Follower.poll`, a new version loaded only once its checksums match, the old one
  served meanwhile and kept when the new one fails;
- the responses: :func:`segment_json`, :func:`panoptic_json`, :func:`model_json`,
  :func:`health_json`.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.errors import UserError
from segpipe.images import ImageError, ImageTooLarge, open_image

if TYPE_CHECKING:
    from segpipe.commands.predict import ImagePredictor, ModelPlan
    from segpipe.inference import Prediction
    from segpipe.params import PredictParams

# Content-Type -> the Pillow format the body must decode as
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/tiff": "TIFF"}
FORMATS = ("png", "json", "panoptic")  # ?format=
ROUTES = {"/v1/segment": "POST", "/v1/model": "GET", "/healthz": "GET"}
PATH_VERSION = "path"  # X-Model-Version of a model served from a checkpoint folder


class ServeError(UserError, RuntimeError):
    """``segpipe serve`` cannot start: the cluster cannot hold the replicas asked for."""


class RequestError(UserError, ValueError):
    """A request the service refuses: ``status`` is its HTTP status, :meth:`body` its JSON answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "status": self.status}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------


def route(method: str, path: str) -> str:
    """The route of a request (``/v1/segment``, ...): 404 for an unknown path, 405 for a wrong method."""
    path = "/" + path.strip("/")
    if path not in ROUTES:
        raise RequestError(404, f"no route {path}; routes: " + ", ".join(f"{m} {p}" for p, m in ROUTES.items()))
    if method.upper() != ROUTES[path]:
        raise RequestError(405, f"{method} {path}: only {ROUTES[path]} is allowed")
    return path


def response_format(query: Mapping[str, str]) -> str:
    """``?format=`` of a segment request: png (the default), json or panoptic."""
    unknown = sorted(set(query) - {"format"})
    if unknown:
        raise RequestError(400, f"unknown query parameter(s) {', '.join(unknown)}; valid: format")
    fmt = query.get("format", "png") or "png"
    if fmt not in FORMATS:
        raise RequestError(400, f"format={fmt}: valid formats are {', '.join(FORMATS)}")
    return fmt


def media_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` header (parameters dropped); 415 unless JPEG, PNG or TIFF."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise RequestError(415, f"Content-Type {content_type or '(none)'!r} is not supported; send the image's "
                                f"bytes as one of {', '.join(MEDIA_TYPES)}")
    return media


def check_length(content_length: str | None, max_body_bytes: int) -> None:
    """413 when the declared body is over ``max_body_bytes`` (a body without a length is counted as it comes)."""
    if content_length is None:
        return
    try:
        size = int(content_length)
    except ValueError:
        raise RequestError(400, f"Content-Length {content_length!r} is not a number") from None
    if size > max_body_bytes:
        raise RequestError(413, too_large_body(size, max_body_bytes))


def too_large_body(size: int, max_body_bytes: int) -> str:
    return f"the body has {size} bytes, over serve.max_body_bytes={max_body_bytes}"


def decode(body: bytes, max_pixels: int) -> np.ndarray:
    """H x W x 3 uint8 of an encoded JPEG, PNG or TIFF, decoded as ``segpipe predict`` decodes a
    file. The size comes from the header and is checked before anything is decoded (413 over
    ``max_pixels``); 400 for bytes that are not an image or do not decode (truncated, corrupt);
    415 for an image of another format (GIF, BMP, ...)."""
    from segpipe.commands.predict import rgb_array

    if not body:
        raise RequestError(400, "the body is empty; send the image's bytes")
    try:
        im = open_image(body, max_pixels, name="", limit_name="serve.max_image_pixels")
    except ImageTooLarge as e:
        raise RequestError(413, str(e)) from None
    except ImageError as e:
        raise RequestError(400, f"the body is not an image: {e}") from None
    with im:
        if im.format not in MEDIA_TYPES.values():
            raise RequestError(415, f"the body is a {im.format} image; send JPEG, PNG or TIFF")
        try:
            return rgb_array(im)
        except Exception as e:  # crafted or damaged input makes Pillow's decoders raise many types
            raise RequestError(400, f"the {im.format} image does not decode (truncated or corrupt?): "
                                    f"{type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` names now: the registry ``version`` (``path`` for a checkpoint folder), its
    ``sha256`` (the registry's ``checkpoint_sha256``: a fused bundle's identity; a folder's
    weights), its ``directory`` and the sha256 of each file the registry recorded (None for a folder)."""

    ref: str
    version: str
    sha256: str
    directory: Path
    files: dict[str, str] | None

    @property
    def key(self) -> tuple[str, str]:
        return self.version, self.sha256

    def verify(self) -> None:
        """RegistryError naming the first file whose sha256 is not the registry's."""
        from segpipe.registry import verify

        if self.files is not None:
            verify(self.directory, self.files)


def follows(ref: str) -> bool:
    """Whether ``--model`` is an alias (followed as it moves), not a fixed version or folder."""
    from segpipe.registry import ALIASES

    return str(ref) in ALIASES


def locate(ref: str | Path, registry: Path | str) -> ModelSource:
    """Read what ``ref`` (an alias, ``vN`` or a checkpoint folder) names in ``registry`` now (one
    read of the index for an alias); nothing is verified or loaded."""
    from segpipe.checkpoint import weights_sha256
    from segpipe.registry import INDEX, RegistryError, alias_entry, find_version, read_index, resolve

    registry = Path(registry)
    if follows(str(ref)):
        entry = alias_entry(read_index(registry), str(ref))
        if entry is None:
            raise RegistryError(f"{registry / INDEX}: no {str(ref)!r} yet; run segpipe promote first")
    else:
        directory, files = resolve(ref, registry)  # a version, or a checkpoint folder; errors name --model
        if files is None:
            return ModelSource(str(ref), PATH_VERSION, weights_sha256(directory), directory, None)
        entry = find_version(read_index(registry), str(ref))
    return ModelSource(str(ref), entry["version"], entry["checkpoint_sha256"], registry / entry["path"],
                       dict(entry["files"]))


@dataclass
class ServedModel:
    """A loaded model: ``predictor`` makes what ``segpipe predict`` makes without ``--panoptic``
    (with it for a fused bundle), ``panoptic`` the same plus panoptic outputs (the same network;
    None for a model without a panoptic output)."""

    source: ModelSource
    plan: ModelPlan
    predictor: ImagePredictor
    panoptic: ImagePredictor | None
    loaded_at: str

    @property
    def classes(self) -> list[dict[str, Any]]:
        from segpipe.commands.predict import panoptic_categories

        return panoptic_categories(list(self.plan.meta.classes))

    @property
    def has_instances(self) -> bool:
        from segpipe.models import spec_of

        return self.plan.bundle or "instances" in spec_of(self.plan.meta.arch).outputs

    def within_one_tile(self, image: np.ndarray) -> bool:
        return self.predictor.within_one_tile(image)

    def predict(self, images: Sequence[np.ndarray], panoptic: Sequence[bool]) -> list[Prediction]:
        """One prediction per image; those with ``panoptic`` set get a panoptic output too (when
        the model has one). Images within one tile run through the network together."""
        out: list[Prediction | None] = [None] * len(images)
        for wanted, predictor in ((False, self.predictor), (True, self.panoptic or self.predictor)):
            idx = [i for i, p in enumerate(panoptic) if bool(p) == wanted]
            if idx:
                for i, pred in zip(idx, predictor.predict([images[i] for i in idx])):
                    out[i] = pred
        return out  # type: ignore[return-value]


def load(source: ModelSource, params: PredictParams, device: str = "cpu") -> ServedModel:
    """Verify ``source``'s files against the registry's sha256, then load it as ``segpipe predict``
    would with ``params`` (a fused bundle: both of its models)."""
    from segpipe.checkpoint import load_model
    from segpipe.commands.predict import ImagePredictor, model_plan
    from segpipe.inference import Predictor
    from segpipe.models import spec_of

    source.verify()
    plan = model_plan(params, source.directory, model_ref=source.ref)
    model, meta = load_model(plan.checkpoint, map_location=device)
    predictor = ImagePredictor(Predictor(model, meta, device=device, **plan.loading), **plan.worker)
    panoptic = predictor if plan.bundle else None
    if not plan.bundle and "panoptic" in spec_of(meta.arch).outputs:
        with_panoptic = model_plan(params, source.directory, panoptic=True, model_ref=source.ref)
        panoptic = ImagePredictor(Predictor(model, meta, device=device, **with_panoptic.loading), **with_panoptic.worker)
    return ServedModel(source, plan, predictor, panoptic, _now())


class Follower:
    """The model a replica serves. For an alias (``champion``, ...), :meth:`poll` reads the
    registry and, when the alias names another version, loads it (checksums first) and serves
    it from then on; requests that hold the old model finish on it. A version that fails to
    load is not retried until the alias moves again; the old model keeps serving and
    ``problem`` says why (``/healthz`` reports it)."""

    def __init__(self, ref: str | Path, registry: Path | str, loader: Callable[[ModelSource], ServedModel]) -> None:
        self.ref, self.registry, self._load = str(ref), Path(registry), loader
        self.current: ServedModel = loader(locate(ref, registry))
        self.problem: dict[str, Any] | None = None
        self._failed: tuple[str, str] | None = None

    @property
    def follows(self) -> bool:
        return follows(self.ref)

    def poll(self) -> bool:
        """One look at the registry; True when the served model changed."""
        try:
            target = locate(self.ref, self.registry)
        except (UserError, OSError) as e:  # e.g. the alias was removed: keep serving what is loaded
            self.problem = {"error": f"{self.ref}: {e}", "time": _now()}
            return False
        if target.key == self.current.source.key:
            self.problem, self._failed = None, None
            return False
        if target.key == self._failed:
            return False
        try:
            model = self._load(target)
        except Exception as e:  # a checksum that fails, a broken checkpoint: the old model keeps serving
            self._failed = target.key
            self.problem = {"version": target.version, "sha256": target.sha256,
                            "error": f"not loaded: {e}", "time": _now()}
            return False
        self.current, self.problem, self._failed = model, None, None
        return True


# --------------------------------------------------------------------------------------
# The responses
# --------------------------------------------------------------------------------------


def model_header(model: ServedModel) -> dict[str, str]:
    return {"X-Model-Version": model.source.version, "X-Model-Sha256": model.source.sha256}


def model_summary(model: ServedModel) -> dict[str, Any]:
    return {"version": model.source.version, "sha256": model.source.sha256, "architecture": model.plan.arch,
            "ref": model.source.ref}


def model_json(model: ServedModel, follows_ref: bool) -> dict[str, Any]:
    """GET /v1/model."""
    meta = model.plan.meta
    return {**model_summary(model), "task": "panoptic" if model.plan.bundle else meta.task,
            "follows": model.source.ref if follows_ref else None, "loaded_at": model.loaded_at,
            "classes": model.classes, "ignore_index": meta.ignore_index,
            "outputs": ["png", "json"] + (["panoptic"] if model.panoptic is not None else [])}


def segment_json(model: ServedModel, pred: Prediction) -> dict[str, Any]:
    """?format=json: the label map's counts and, for instance and panoptic models, the detections
    (``segmentation``: compressed COCO RLE, ``bbox``: x y w h)."""
    from segpipe.inference import coco_results

    h, w = pred.labels.shape
    classes = model.classes
    names = {c["id"]: c["name"] for c in classes}
    counts = np.bincount(pred.labels.ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    doc: dict[str, Any] = {
        "model": model_summary(model), "height": h, "width": w, "classes": classes,
        "pixels_per_class": {names[i]: int(counts[i]) for i in sorted(names)},
        "unlabelled_pixels": int(h * w - sum(int(counts[i]) for i in names)),
    }
    if model.has_instances:
        found = coco_results(pred.instances or [], 0, h, w)
        doc["instances"] = [{"class": names.get(r["category_id"], str(r["category_id"])), "class_id": r["category_id"],
                             "score": r["score"], "bbox": r["bbox"], "area": r["area"],
                             "segmentation": r["segmentation"]} for r in found]
    return doc


def panoptic_json(model: ServedModel, pred: Prediction) -> dict[str, Any]:
    """?format=panoptic: the COCO panoptic PNG (segment id = R + 256 G + 256^2 B) as base64, its
    ``segments_info`` and the ``categories`` (with ``isthing``), as predict's panoptic.json has them."""
    from segpipe.panoptic import encode_png

    if pred.panoptic is None:
        raise RequestError(400, f"format=panoptic: model {model.source.version} ({model.plan.arch}) has no panoptic "
                                f"output; serve maskformer or a fused bundle (e.g. --model panoptic-champion)")
    h, w = pred.labels.shape
    seg_map, segments = pred.panoptic
    return {"model": model_summary(model), "height": h, "width": w, "segments_info": segments,
            "categories": model.classes, "png_base64": base64.b64encode(encode_png(seg_map)).decode("ascii")}


def health_json(follower: Follower) -> dict[str, Any]:
    """GET /healthz: ``ok``, or ``stale`` when the alias names a version that could not be loaded
    (the model named in ``model`` still serves; ``problem`` says why)."""
    return {"status": "stale" if follower.problem else "ok", "model": model_summary(follower.current),
            "follows": follower.ref if follower.follows else None, "loaded_at": follower.current.loaded_at,
            "problem": follower.problem}


__all__ = [
    "FORMATS", "Follower", "MEDIA_TYPES", "ModelSource", "RequestError", "ROUTES", "ServeError", "ServedModel",
    "check_length", "decode", "follows", "health_json", "load", "locate", "media_type", "model_header", "model_json",
    "panoptic_json", "response_format", "route", "segment_json", "too_large_body",
]

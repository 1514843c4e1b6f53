"""Data quality from a trained model: the pure logic of ``segpipe audit``, ``select`` and ``drift``.

Nothing here runs a model or reads data: the commands (``segpipe/commands/audit.py``,
``select.py``, ``drift.py``) get class probabilities from ``segpipe.inference`` and hand arrays
to these functions; :func:`probability_model` resolves the model they all take. Every method is written from its published definition (no copyleft code):

- audit: the regions of a label map (:func:`label_regions`), each region's mean class
  probabilities over its interior (:func:`region_probability_sums`, :func:`interior`), and two
  scores of how strongly the model disagrees with a region's label: *self-confidence*
  ``1 - p(label)``, and *confident learning*'s per-class thresholds and normalised margin
  (Northcutt, Jiang & Chuang, JAIR 2021), applied to regions (:func:`audit_scores`);
- select: per-pixel uncertainty (:func:`frame_uncertainty`: entropy, margin, confidence) and a
  selection that is uncertain and diverse (:func:`select_frames`: greedy k-center, Gonzalez 1985 /
  Sener & Savarese 2018's core-set, with each candidate's distance weighted by its uncertainty);
- drift: two-sample measures per feature (:func:`psi`, the population stability index of two
  histograms; :func:`ks`, the Kolmogorov-Smirnov statistic and its p-value) and the verdict
  (:func:`judge_feature`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.errors import UserError

if TYPE_CHECKING:
    from segpipe.checkpoint import CheckpointMeta


class NoProbabilities(UserError, ValueError):
    """The model has no per-pixel class probabilities (an instance-only architecture)."""


def probability_model(ref: str | Path, registry: Path | str) -> tuple[Path, CheckpointMeta]:
    """The checkpoint folder and meta of ``--model`` (an alias, a version or a checkpoint folder,
    sha256-verified by ``segpipe.registry.checkpoint_dir``); a fused registry bundle gives its
    semantic member. NoProbabilities when the model has no semantic output to take class
    probabilities from."""
    from segpipe.checkpoint import load_meta
    from segpipe.models import spec_of
    from segpipe.registry import checkpoint_dir, read_bundle

    directory = checkpoint_dir(ref, registry)
    bundle = read_bundle(directory)
    if bundle is not None:
        directory = directory / bundle["members"]["semantic"]
    meta = load_meta(directory)
    if "semantic" not in spec_of(meta.arch).outputs:
        raise NoProbabilities(f"--model {ref}: {meta.arch} has no semantic output, so no per-pixel class "
                              "probabilities; use a semantic model (unet, fcn*, deeplabv3, maskformer)")
    return directory, meta

# --------------------------------------------------------------------------------------
# audit: regions, their probabilities, scores
# --------------------------------------------------------------------------------------

AUDIT_METHODS = ("confident_learning", "self_confidence")


@dataclass(frozen=True)
class Region:
    """One labelled region of an image: an instance annotation (``annotation_id`` set) or a
    connected region of one class in the label map outside every annotation (``annotation_id``
    None). ``mask`` is H x W bool; ``bbox`` is x, y, w, h of the mask."""

    class_id: int
    mask: np.ndarray
    annotation_id: int | None = None
    iscrowd: bool = False

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def interior(self, border: int, min_area: int = 1) -> np.ndarray:
        """The pixels the region is judged by: the mask without its outer ``border`` pixels (see
        :func:`interior`), or the whole mask when fewer than ``min_area`` would be left (a thin
        or small annotation is judged whole)."""
        inside = interior(self.mask, border)
        return inside if inside.sum() >= max(1, min_area) else self.mask

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        if rows.size == 0:
            return 0, 0, 0, 0
        return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def interior(mask: np.ndarray, border: int) -> np.ndarray:
    """``mask`` eroded by ``border`` pixels: a model's probabilities blur across object borders,
    so a region is judged by its inside. The frame's edge erodes nothing (a region the image or a
    tile cuts keeps its pixels there)."""
    if border <= 0:
        return mask
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=border, border_value=1)


def label_regions(semantic: np.ndarray, instances: Sequence[Mapping[str, Any]], ignore_index: int,
                  min_area: int, border: int = 0) -> list[Region]:
    """The regions of one labelled image: every instance annotation (``{"id", "category_id",
    "iscrowd", "segmentation": COCO RLE}``, as ``segpipe.shards`` decodes them), then every
    8-connected region of one class among the label map's pixels that no annotation covers and
    that are not ``ignore_index`` (stuff, and things of a label map without annotations), row-major.
    An annotation of fewer than ``min_area`` pixels is left out (a handful of pixels gives no
    stable score), and so is a label-map region with fewer than ``min_area`` pixels inside
    ``border`` (:func:`interior`): a sliver between objects, all border, is nobody's annotation."""
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    height, width = semantic.shape
    covered = np.zeros((height, width), dtype=bool)
    regions = []
    for inst in instances:
        rle = dict(inst["segmentation"])
        rle["counts"] = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        mask = mask_utils.decode(rle).astype(bool)
        if mask.shape != (height, width):
            raise ValueError(f"annotation {inst.get('id')}: mask of {mask.shape}, label map of {(height, width)}")
        covered |= mask
        if mask.sum() >= max(1, min_area):
            regions.append(Region(int(inst["category_id"]), mask, int(inst["id"]), bool(inst.get("iscrowd"))))
    free = ~covered & (semantic != ignore_index)
    eight = np.ones((3, 3), dtype=bool)
    for class_id in np.unique(semantic[free]).tolist():
        components, n = ndimage.label(free & (semantic == class_id), structure=eight)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        for label in range(1, n + 1):
            if sizes[label] >= max(1, min_area) and interior(components == label, border).sum() >= max(1, min_area):
                regions.append(Region(int(class_id), components == label))
    return regions


def region_probability_sums(probs: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """``N x K`` sums of the class probabilities (``probs``: K x H x W) over each of ``masks``
    (H x W bool). Sums, not means, so the pieces of one annotation (cut by tiles) add up; divide
    by the masks' pixels."""
    flat = probs.reshape(probs.shape[0], -1)
    out = np.zeros((len(masks), probs.shape[0]), dtype=np.float64)
    for i, m in enumerate(masks):
        out[i] = flat[:, m.ravel()].sum(axis=1, dtype=np.float64)
    return out


def class_thresholds(mean_probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Confident learning's per-class thresholds: ``t_k``, the mean probability of class ``k``
    over the regions labelled ``k`` (the model's typical self-confidence on that class). NaN for a
    class no region is labelled with."""
    out = np.full(num_classes, np.nan)
    for k in range(num_classes):
        chosen = labels == k
        if chosen.any():
            out[k] = float(mean_probs[chosen, k].mean())
    return out


@dataclass(frozen=True)
class AuditScores:
    """Per region: ``score`` (higher = the model disagrees more with the label) and the class the
    model gives the region (``predicted``)."""

    score: np.ndarray
    predicted: np.ndarray


def audit_scores(mean_probs: np.ndarray, labels: np.ndarray, method: str) -> AuditScores:
    """How strongly the model disagrees with each region's label (``mean_probs``: N x K mean class
    probabilities of the regions, ``labels``: their N classes):

    - ``self_confidence``: ``1 - p(label)``, in [0, 1]; the predicted class is the most probable;
    - ``confident_learning``: each probability measured against what the model usually gives
      regions of that class, ``c_k = min(1, p(k) / t_k)`` with ``t_k`` the class's threshold
      (:func:`class_thresholds`); the score is ``max over k != label of c_k - c_label``, in
      [-1, 1] (Northcutt et al.'s normalised margin, on calibrated probabilities): positive when
      the region looks more like another class than like its own, each by its class's standard,
      so a class the model is always unsure of does not fill the list, and neither does a region
      the model is merely unsure of. The predicted class is that other class when the score is
      positive, the label otherwise.
    """
    if method not in AUDIT_METHODS:
        raise ValueError(f"unknown audit method {method!r}; valid: {', '.join(AUDIT_METHODS)}")
    n, k = mean_probs.shape
    labels = np.asarray(labels, dtype=np.int64)
    rows = np.arange(n)
    if method == "self_confidence":
        return AuditScores(1.0 - mean_probs[rows, labels], mean_probs.argmax(axis=1))
    t = class_thresholds(mean_probs, labels, k)
    calibrated = np.minimum(1.0, mean_probs / np.where(np.isnan(t) | (t <= 0), 1.0, t)[None, :])
    own = calibrated[rows, labels]
    others = calibrated.copy()
    others[rows, labels] = -np.inf
    best = others.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    score = others[rows, best] - own if n else np.zeros(0)
    return AuditScores(score, np.where(score > 0, best, labels))


def rank_order(scores: np.ndarray, keys: Sequence[Any]) -> list[int]:
    """Indices by score, highest first; equal scores in ``keys`` order (stable across runs and engines)."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), keys[i]))


def precision_at_k(ranked: Sequence[Any], relevant: Iterable[Any], k: int | None = None) -> float:
    """The share of the first ``k`` (default: as many as there are relevant items) that are relevant."""
    relevant = set(relevant)
    k = len(relevant) if k is None else k
    if k <= 0:
        return float("nan")
    return sum(1 for x in list(ranked)[:k] if x in relevant) / k


# --------------------------------------------------------------------------------------
# select: uncertainty per frame, uncertain and diverse selection
# --------------------------------------------------------------------------------------

STRATEGIES = ("diverse", "entropy", "margin")


@dataclass
class FrameUncertainty:
    """Accumulates one frame's per-pixel uncertainty strip by strip (``add``), then its means:
    ``entropy`` (normalised by log K, in [0, 1]), ``margin`` (1 - (top-1 - top-2 probability)),
    ``confidence`` (top-1 probability) and ``class_shares`` (mean probability of each class)."""

    pixels: int = 0
    sums: np.ndarray = field(default_factory=lambda: np.zeros(3))
    class_sums: np.ndarray | None = None

    def add(self, probs: np.ndarray) -> None:
        """One strip of ``K x rows x W`` probabilities."""
        k = probs.shape[0]
        flat = probs.reshape(k, -1).astype(np.float64)
        logp = np.log(np.clip(flat, 1e-12, 1.0))
        entropy = -(flat * logp).sum(axis=0) / (math.log(k) if k > 1 else 1.0)
        top2 = np.sort(flat, axis=0)[-2:] if k > 1 else np.concatenate([np.zeros_like(flat), flat])
        self.sums += [entropy.sum(), (1.0 - (top2[1] - top2[0])).sum(), top2[1].sum()]
        classes = flat.sum(axis=1)
        self.class_sums = classes if self.class_sums is None else self.class_sums + classes
        self.pixels += flat.shape[1]

    def _mean(self, i: int) -> float:
        return float(self.sums[i] / self.pixels) if self.pixels else float("nan")

    @property
    def entropy(self) -> float:
        return self._mean(0)

    @property
    def margin(self) -> float:
        return self._mean(1)

    @property
    def confidence(self) -> float:
        return self._mean(2)

    @property
    def class_shares(self) -> np.ndarray:
        return self.class_sums / self.pixels if self.class_sums is not None else np.zeros(0)


def frame_uncertainty(strips: Iterable[np.ndarray]) -> FrameUncertainty:
    """The uncertainty of one frame from its probability strips (``K x rows x W`` each)."""
    acc = FrameUncertainty()
    for s in strips:
        acc.add(s)
    return acc


def uncertainty_of(entropy: float, margin: float, strategy: str) -> float:
    """The uncertainty a strategy ranks by: mean pixel entropy (``entropy``, and ``diverse``), or
    the mean margin score (``margin``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    return margin if strategy == "margin" else entropy


@dataclass(frozen=True)
class Pick:
    """One selected frame: its index in the pool, its uncertainty, and (diverse) its distance in
    the embedding to the nearest frame picked before it (None for the first)."""

    index: int
    uncertainty: float
    distance: float | None = None


def standardise(embeddings: np.ndarray) -> np.ndarray:
    """Each dimension to zero mean and unit variance over the pool (constant ones become 0), so
    no feature dominates the distances by its scale alone."""
    x = np.asarray(embeddings, dtype=np.float64)
    std = x.std(axis=0)
    return np.where(std > 0, (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0), 0.0)


def k_center_greedy(points: np.ndarray, weights: np.ndarray, k: int,
                    near: float | None = None) -> list[tuple[int, float | None]]:
    """Greedy k-center weighted by ``weights``: first the heaviest point, then again and again the
    point that maximises ``weight x min(1, d / near)``, ``d`` its distance to the nearest chosen
    point (``weight x d`` when ``near`` is None). With ``near``, a point farther than ``near`` from
    every chosen one competes on its weight alone, and a closer one is worth the less the closer
    it is. Stops early when every point left is at distance 0 from a chosen one (an exact
    duplicate teaches nothing new). Returns ``(index, distance when chosen)``; ties go to the
    lower index."""
    n = len(points)
    if n == 0 or k <= 0:
        return []
    w = np.asarray(weights, dtype=np.float64) + 1e-9  # a frame the model is sure of may still be new
    first = int(np.argmax(w))
    chosen: list[tuple[int, float | None]] = [(first, None)]
    nearest = np.linalg.norm(points - points[first], axis=1)
    nearest[first] = 0.0
    while len(chosen) < min(k, n):
        gain = w * (nearest if not near else np.minimum(1.0, nearest / near))
        best = int(np.argmax(gain))
        if nearest[best] <= 0.0:
            break
        chosen.append((best, float(nearest[best])))
        nearest = np.minimum(nearest, np.linalg.norm(points - points[best], axis=1))
        nearest[best] = 0.0
    return chosen


NEAR_SAMPLE = 1000  # frames whose pairwise distances give the pool's typical distance


def typical_distance(points: np.ndarray) -> float:
    """The median distance between two distinct frames of the pool (of an evenly spaced sample of
    at most NEAR_SAMPLE frames); 0 when every frame is the same."""
    from scipy.spatial.distance import pdist

    sample = points[evenly_spaced(len(points), NEAR_SAMPLE)]
    d = pdist(sample) if len(sample) > 1 else np.zeros(0)
    d = d[d > 0]
    return float(np.median(d)) if d.size else 0.0


def select_frames(uncertainty: np.ndarray, k: int, strategy: str, embeddings: np.ndarray | None = None,
                  near: float = 0.5) -> list[Pick]:
    """The ``k`` frames worth labelling. ``entropy`` and ``margin``: the most uncertain first.
    ``diverse``: :func:`k_center_greedy` on the standardised ``embeddings`` weighted by the
    uncertainty, two frames closer than ``near`` x the pool's :func:`typical_distance` counting as
    near-duplicates: one flight's near-identical frames do not fill the list, and frames apart
    compete on uncertainty. Fewer than ``k`` come back when the pool has fewer distinct frames."""
    u = np.asarray(uncertainty, dtype=np.float64)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if strategy != "diverse":
        order = sorted(range(len(u)), key=lambda i: (-u[i], i))[: max(0, k)]
        return [Pick(i, float(u[i])) for i in order]
    if embeddings is None or len(embeddings) != len(u):
        raise ValueError("the diverse strategy needs one embedding per frame")
    points = standardise(embeddings)
    scale = near * typical_distance(points)
    return [Pick(i, float(u[i]), d) for i, d in k_center_greedy(points, u, k, scale or None)]


# --------------------------------------------------------------------------------------
# drift: per-image statistics and two-sample measures
# --------------------------------------------------------------------------------------

CHANNELS = ("red", "green", "blue")
# Rec. 601 luma: brightness as a person sees it
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageStats:
    """What drift compares of one image: its size, mean brightness (luma, 0..255) and per-channel
    value histograms (3 x ``bins`` pixel counts over 0..255)."""

    height: int
    width: int
    brightness: float
    histograms: np.ndarray


def image_stats(image: np.ndarray, bins: int) -> ImageStats:
    """:class:`ImageStats` of an ``H x W x 3`` uint8 image."""
    h, w = image.shape[:2]
    flat = image.reshape(-1, 3)
    brightness = float((flat.astype(np.float64) @ np.asarray(LUMA)).mean()) if flat.size else float("nan")
    edges = (np.arange(256) * bins) // 256  # value -> bin: equal-width bins over 0..255
    hist = np.stack([np.bincount(edges[flat[:, c]], minlength=bins) for c in range(3)]).astype(np.int64)
    return ImageStats(h, w, brightness, hist)


def class_pixels(semantic: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class id ``0..num_classes-1`` of a label map (ignore and unknown values left out)."""
    values = semantic.ravel().astype(np.int64)
    return np.bincount(values[(values >= 0) & (values < num_classes)], minlength=num_classes)[:num_classes]


PSI_FLOOR = 1e-4  # share given to an empty bin, so that an empty bin on one side is finite


def psi(expected: np.ndarray, actual: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """Population stability index of two histograms over the same bins (counts or shares):
    ``sum((a - e) * ln(a / e))`` over the bins' shares, each share at least ``floor``. 0 for equal
    distributions; ~0.1 is commonly read as a moderate shift, ~0.25 as a large one."""
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.sum() <= 0 or a.sum() <= 0:
        raise ValueError(f"psi needs two non-empty histograms of the same bins, got {e.shape} and {a.shape}")
    e = np.maximum(e / e.sum(), floor)
    a = np.maximum(a / a.sum(), floor)
    return float(((a - e) * np.log(a / e)).sum())


def ks(reference: Sequence[float], sample: Sequence[float]) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic (the largest gap between the two empirical
    distribution functions, 0..1) and its p-value (scipy's exact or asymptotic test)."""
    from scipy import stats

    r, s = np.asarray(reference, dtype=np.float64), np.asarray(sample, dtype=np.float64)
    if r.size == 0 or s.size == 0:
        raise ValueError("ks needs two non-empty samples")
    result = stats.ks_2samp(r, s)
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's verdict: its ``measure`` (``psi`` | ``ks``), ``value`` and ``threshold``; a KS
    feature also has its ``p_value`` and drifts only when that is below ``alpha`` (a small sample
    can show a large statistic by chance). ``reference`` and ``input`` summarise the two sides."""

    name: str
    measure: str
    value: float
    threshold: float
    drifted: bool
    p_value: float | None = None
    reference: float | None = None
    input: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"measure": self.measure, "value": round(self.value, 6), "threshold": self.threshold,
               "drifted": self.drifted}
        if self.p_value is not None:
            out["p_value"] = float(f"{self.p_value:.6g}")
        for side in ("reference", "input"):
            value = getattr(self, side)
            out[side] = None if value is None else round(value, 6)
        return out


def judge_ks(name: str, reference: Sequence[float], sample: Sequence[float], threshold: float,
             alpha: float) -> FeatureDrift:
    """A per-image feature: drifted when the KS statistic exceeds ``threshold`` and its p-value is
    below ``alpha``. The sides are summarised by their means."""
    stat, p = ks(reference, sample)
    return FeatureDrift(name, "ks", stat, threshold, bool(stat > threshold and p < alpha), p,
                        float(np.mean(reference)), float(np.mean(sample)))


def judge_psi(name: str, reference: np.ndarray, sample: np.ndarray, threshold: float,
              summary: tuple[float | None, float | None] = (None, None)) -> FeatureDrift:
    """A pooled histogram: drifted when its PSI exceeds ``threshold``."""
    value = psi(reference, sample)
    return FeatureDrift(name, "psi", value, threshold, bool(value > threshold), None, *summary)


def histogram_mean(hist: np.ndarray) -> float:
    """The mean pixel value (0..255) of a ``bins``-bin histogram over 0..255, from bin centres."""
    bins = len(hist)
    centres = (np.arange(bins) + 0.5) * 256.0 / bins
    total = hist.sum()
    return float((hist * centres).sum() / total) if total else float("nan")


def evenly_spaced(n: int, limit: int) -> list[int]:
    """At most ``limit`` of the indices ``0..n-1``, spread evenly (all of them when n <= limit):
    a deterministic sample that covers a whole dataset, not its first files."""
    if n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit).round()})


def format_drift_table(features: Mapping[str, Mapping[str, Any]], skipped: Mapping[str, str]) -> str:
    """The short table ``segpipe drift`` prints: one line per feature, then the skipped ones."""
    lines = [f"{'feature':<20} {'measure':<7} {'value':>8} {'threshold':>9}  {'drifted':<7}  reference -> input"]
    for name, f in features.items():
        sides = "" if f.get("reference") is None else f"{f['reference']:.4g} -> {f['input']:.4g}"
        p = f" (p={f['p_value']:.2g})" if f.get("p_value") is not None else ""
        lines.append(f"{name:<20} {f['measure']:<7} {f['value']:>8.4f} {f['threshold']:>9.4g}  "
                     f"{'YES' if f['drifted'] else 'no':<7}  {sides}{p}")
    lines += [f"{name:<20} skipped: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


__all__ = [
    "AUDIT_METHODS", "NoProbabilities", "probability_model", "AuditScores", "CHANNELS", "FeatureDrift", "FrameUncertainty", "ImageStats", "Pick", "Region",
    "STRATEGIES", "audit_scores", "class_pixels", "class_thresholds", "evenly_spaced", "format_drift_table",
    "frame_uncertainty", "histogram_mean", "image_stats", "interior", "judge_ks", "judge_psi", "k_center_greedy", "ks",
    "label_regions", "precision_at_k", "psi", "rank_order", "region_probability_sums", "select_frames", "standardise",
    "typical_distance", "uncertainty_of",
]

"""Phrase-grounding metrics of the LAPVQA grounding card: mean IoU, accuracy at IoU 0.25 and 0.5, pointing accuracy.

One predicted box per (image, phrase) against the phrase's ground-truth boxes (one or more: MS-CXR marks both
lungs of a bilateral finding separately). The IoU is taken with the box enclosing them all, the target a single-box
head is trained on (one box: the box itself); Acc@t is the fraction of examples with IoU >= t; pointing accuracy
the fraction whose predicted box centre lies inside one of the ground-truth boxes (edges included). Boxes are
(x0, y0, x1, y1), in pixels or normalised alike: IoU and containment do not change when both axes are scaled.
"""

from collections.abc import Sequence

import numpy as np

ACCURACY_THRESHOLDS = (0.25, 0.5)
GROUNDING_METRICS = ("miou", "acc25", "acc50", "pointing")  # what `score_grounding` reports

Box = Sequence[float]


def enclosing_box(boxes: Sequence[Box]) -> list[float]:
    """The smallest (x0, y0, x1, y1) box holding every one of `boxes`."""
    corners = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return [*corners[:, :2].min(axis=0).tolist(), *corners[:, 2:].max(axis=0).tolist()]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when they do not overlap or both are empty."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    return intersection / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection)


def points_inside(box: Box, truths: Sequence[Box]) -> bool:
    """Whether `box`'s centre lies inside (or on the edge of) one of `truths`."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return any(t[0] <= x <= t[2] and t[1] <= y <= t[3] for t in truths)


def _check(predictions: Sequence[Box], references: Sequence[Sequence[Box]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted boxes but {len(references)} references; expected one each.")
    for index, box in enumerate(predictions):
        if len(box) != 4:
            raise ValueError(f"predictions[{index}] must be one (x0, y0, x1, y1) box, got {list(box)}.")
    for index, truths in enumerate(references):
        if not truths or any(len(box) != 4 for box in truths):
            raise ValueError(f"references[{index}] must be a non-empty list of (x0, y0, x1, y1) boxes, got {truths}.")


def grounding_scores(predictions: Sequence[Box], references: Sequence[Sequence[Box]]) -> dict[str, float]:
    """`{"miou", "acc25", "acc50", "pointing", "count"}` of `predictions` (one box per example) against `references`
    (each example's ground-truth boxes); all 0 with no examples."""
    _check(predictions, references)
    ious = np.array([box_iou(box, enclosing_box(truths)) for box, truths in zip(predictions, references, strict=True)])
    hits = [points_inside(box, truths) for box, truths in zip(predictions, references, strict=True)]
    if not len(ious):
        return {name: 0.0 for name in GROUNDING_METRICS} | {"count": 0}
    accuracies = {f"acc{round(t * 100)}": float((ious >= t).mean()) for t in ACCURACY_THRESHOLDS}
    return {"miou": float(ious.mean()), **accuracies, "pointing": float(np.mean(hits)), "count": len(ious)}


def score_grounding(
    predictions: Sequence[Box], references: Sequence[Sequence[Box]], groups: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """`{"overall": grounding_scores(...), "<group>": ...}`: the scores over every example and, with `groups` (one
    name per example, e.g. MS-CXR's finding category), over each group's."""
    scores = {"overall": grounding_scores(predictions, references)}
    if groups is not None:
        if len(groups) != len(predictions):
            raise ValueError(f"{len(groups)} groups but {len(predictions)} predictions; expected one group each.")
        for group in sorted(set(groups)):
            chosen = [index for index, name in enumerate(groups) if name == group]
            scores[group] = grounding_scores([predictions[i] for i in chosen], [references[i] for i in chosen])
    return scores


__all__ = [
    "ACCURACY_THRESHOLDS",
    "GROUNDING_METRICS",
    "box_iou",
    "enclosing_box",
    "grounding_scores",
    "points_inside",
    "score_grounding",
]

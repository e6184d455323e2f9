"""Detection metrics of the LAPVQA detection card: mean average precision at IoU 0.4 and 0.5 (`map40`, `map50`).

Computed by pycocotools' `COCOeval` (the reference COCO implementation) with the IoU thresholds set to those of the
card, one area range (all boxes) and up to 100 detections per image: per class, the 101-point interpolated average
precision over the images, then the mean over the classes that have ground-truth boxes (a class without any is
left out, and so are its detections, as COCO does). Boxes are (x0, y0, x1, y1), in pixels or normalised alike: IoU
does not change when both axes are scaled.
"""

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_THRESHOLDS = (0.4, 0.5)  # the card's val_map40 / val_map50
MAX_DETECTIONS = 100  # per image, as COCO


def metric_name(iou_threshold: float) -> str:
    """`map40` for 0.4, `map50` for 0.5."""
    return f"map{round(iou_threshold * 100)}"


def _check(name: str, items: list[dict], keys: tuple[str, ...]) -> None:
    for index, item in enumerate(items):
        if not all(key in item for key in keys):
            raise ValueError(f"{name}[{index}] must have {list(keys)}, got {sorted(item)}.")
        lengths = {key: len(item[key]) for key in keys}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{name}[{index}] must have as many of each of {list(keys)}, got {lengths}.")


def average_precisions(
    predictions: list[dict], references: list[dict], iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS
) -> dict[int, np.ndarray]:
    """`{class id: [AP at each IoU threshold]}` for every class with ground-truth boxes.

    `predictions`: one dict per image, `boxes` (x0, y0, x1, y1), `scores` and `labels` (class ids); `references`:
    one dict per image (the same images, in the same order), `boxes` and `labels`.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} images of predictions but {len(references)} of references.")
    _check("predictions", predictions, ("boxes", "scores", "labels"))
    _check("references", references, ("boxes", "labels"))
    annotations = [
        {"image_id": image, "category_id": int(label) + 1, "bbox": _xywh(box), "iscrowd": 0}
        for image, reference in enumerate(references)
        for box, label in zip(reference["boxes"], reference["labels"], strict=True)
    ]
    classes = sorted({annotation["category_id"] for annotation in annotations})
    if not classes:
        return {}
    for number, annotation in enumerate(annotations, start=1):
        annotation.update(id=number, area=annotation["bbox"][2] * annotation["bbox"][3])
    detections = [
        {"image_id": image, "category_id": int(label) + 1, "bbox": _xywh(box), "score": float(score)}
        for image, prediction in enumerate(predictions)
        for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"], strict=True)
    ]
    if not detections:  # nothing found: no recall, whatever the threshold
        return {category - 1: np.zeros(len(iou_thresholds)) for category in classes}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        images = [{"id": image} for image in range(len(references))]
        truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in classes]}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluation.params.iouThrs = np.asarray(iou_thresholds, dtype=float)
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0.0, float("inf")]], ["all"]
        evaluation.params.maxDets = [MAX_DETECTIONS]
        evaluation.evaluate()
        evaluation.accumulate()
    # precision: [thresholds, recall points, classes, area ranges, max detections]; -1 where a class has no boxes
    precision = evaluation.eval["precision"][:, :, :, 0, 0]
    return {category - 1: precision[:, :, index].mean(axis=1) for index, category in enumerate(classes)}


def _xywh(box) -> list[float]:
    x0, y0, x1, y1 = (float(value) for value in box)
    return [x0, y0, x1 - x0, y1 - y0]


def score_detections(
    predictions: list[dict],
    references: list[dict],
    id2label: dict[int, str] | None = None,
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
) -> dict[str, dict[str, float]]:
    """`{"overall": {"map40": ..., "map50": ..., "count": images}, "<class>": {"map40": ..., "count": boxes}}`:
    mAP over the classes with ground-truth boxes (0 when there are none), and each such class's AP, named by
    `id2label`. Arguments as `average_precisions`."""
    per_class = average_precisions(predictions, references, iou_thresholds)
    names = [metric_name(threshold) for threshold in iou_thresholds]
    overall = np.mean(list(per_class.values()), axis=0) if per_class else np.zeros(len(names))
    scores = {"overall": {**dict(zip(names, map(float, overall), strict=True)), "count": len(references)}}
    boxes = [int(label) for reference in references for label in reference["labels"]]
    for label, values in sorted(per_class.items()):
        name = id2label.get(label, str(label)) if id2label is not None else str(label)
        scores[name] = {**dict(zip(names, map(float, values), strict=True)), "count": boxes.count(label)}
    return scores


__all__ = ["IOU_THRESHOLDS", "average_precisions", "metric_name", "score_detections"]

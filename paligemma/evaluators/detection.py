"""Detection: `<loc>` outputs -> labelled pixel boxes, COCO mAP (pycocotools), mean IoU.

A prediction is parsed by `paligemma.tokenizer.parse_detections`: objects joined by
" ; ", each four `<locNNNN>` tokens and a label; anything else is a malformed object,
counted in `malformed`, never fatal, and left out of the boxes.

Ground truth: the example's `objects` ([{"label", "box": [y1, x1, y2, x2] in [0, 1]}],
as the shapes and coco_detection sources give), else its parsed `suffix`. Boxes are
scaled to pixels by the image's own size (read from the file header, not the resized
input).

mAP: COCO's mAP@[.5:.95] (`map`) and mAP@.5 (`map50`) over all examples, with
pycocotools. PaliGemma gives no confidence per box, so every box scores 1 (ties keep
the output order). `mean_iou`: over examples with exactly one ground-truth object,
the IoU of the first predicted box with that object's label (0 if none): how well a
single-object prompt is localised.

Metrics: map, map50, mean_iou, num_single_object, malformed, num_predicted, num_gt.
"""

import contextlib
import io

import numpy as np
from PIL import Image

from paligemma import tokenizer as tokenizer_lib
from paligemma.evaluators import base

def to_pixels(box, height, width):
  """float64[4] (y1, x1, y2, x2) in [0, 1] -> pixels (same order)."""
  return np.asarray(box, np.float64) * [height, width, height, width]


def iou(a, b):
  """IoU of two boxes (y1, x1, y2, x2)."""
  inter_h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  inter_w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = inter_h * inter_w
  area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


def image_hw(image):
  """(height, width) of an image given as a path, encoded bytes or an array."""
  if isinstance(image, (bytes, bytearray)):
    image = io.BytesIO(image)
  if hasattr(image, "shape"):
    return int(image.shape[0]), int(image.shape[1])
  with Image.open(image) as im:  # Reads the header only.
    return im.height, im.width


def coco_map(ground_truth, predictions):
  """(mAP@[.5:.95], mAP@.5) with pycocotools.

  ground_truth, predictions: per image, lists of (label, pixel box (y1, x1, y2, x2)).
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  labels = sorted({l for objs in ground_truth + predictions for l, _ in objs})
  cat = {l: i + 1 for i, l in enumerate(labels)}
  xywh = lambda b: [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]
  gt_anns, dets = [], []
  for img, objs in enumerate(ground_truth):
    for label, box in objs:
      x, y, w, h = xywh(box)
      gt_anns.append(dict(id=len(gt_anns) + 1, image_id=img, category_id=cat[label],
                          bbox=[x, y, w, h], area=w * h, iscrowd=0))
  for img, objs in enumerate(predictions):
    for label, box in objs:
      dets.append(dict(image_id=img, category_id=cat[label], bbox=xywh(box), score=1.0))
  if not gt_anns or not dets:
    return 0.0, 0.0
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress.
    gt = COCO()
    gt.dataset = dict(images=[{"id": i} for i in range(len(ground_truth))], annotations=gt_anns,
                      categories=[{"id": i, "name": l} for l, i in cat.items()])
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  # stats[0], stats[1]: AP@[.5:.95] and AP@.5 over all areas; -1 means "no ground truth".
  return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


class DetectionEvaluator(base.DecodingEvaluator):
  """Metrics: map, map50, mean_iou, malformed, ... (see the module docstring)."""

  def _ground_truth(self, ex):
    if ex.get("objects") is not None:
      return [(o["label"], np.asarray(o["box"], np.float64)) for o in ex["objects"]]
    return tokenizer_lib.parse_detections(ex.get("suffix") or "")[0]

  def score(self, preds):
    gts, dets, ious, malformed = [], [], [], 0
    for p in preds:
      ex = self.source[p["index"]]
      h, w = image_hw(ex["image"])
      objects, bad = tokenizer_lib.parse_detections(p["prediction"])
      malformed += bad
      gt = [(l, to_pixels(b, h, w)) for l, b in self._ground_truth(ex)]
      det = [(l, to_pixels(b, h, w)) for l, b in objects]
      p["boxes"] = [{"label": l, "box": [round(float(v), 1) for v in b]} for l, b in det]
      p["malformed"] = bad
      gts.append(gt)
      dets.append(det)
      if len(gt) == 1:
        same = [b for l, b in det if l == gt[0][0]]
        ious.append(iou(gt[0][1], same[0]) if same else 0.0)
    map_all, map50 = coco_map(gts, dets)
    return {"map": map_all, "map50": map50,
            "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "num_single_object": float(len(ious)), "malformed": float(malformed),
            "num_predicted": float(sum(map(len, dets))), "num_gt": float(sum(map(len, gts)))}

  def record(self, pred):
    """Adds `boxes` ([{label, box: pixel y1, x1, y2, x2}]) and `malformed`."""
    out = super().record(pred)
    out.update(boxes=pred.get("boxes", []), malformed=pred.get("malformed", 0))
    return out

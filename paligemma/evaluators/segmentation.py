"""Segmentation: `<loc>`x4 + `<seg>`x16 outputs -> masks; mIoU, cIoU, box accuracy.

Config keys besides the common ones: `vae` (required), the mask VQ-VAE the outputs are
decoded with (a path to big_vision's `vae-oid.npz`, or "shapes" for the demo's VAE);
`max_decode_len` defaults to 24 (one object: 20 tokens, a short label and eos). Predictions are
parsed by `paligemma.segmentation.parse_segmentation` (big_vision's decoding: loc / 1023,
pixel box by truncation, 64x64 logit resized into it, > 0).

Ground truth: the example's `objects`, each with a `box` ([y1, x1, y2, x2] in [0, 1]) and
a `mask` (bool[H, W] array, a mask image path, or COCO RLE {"size", "counts"}), at the
image's own resolution; without `objects`, its `suffix` decoded with the same VAE.

Per example (big_vision's refcoco evaluator when there is one object, as in RefCOCO):
- one ground-truth object: the first valid predicted object only (big_vision reads the
  first 20 tokens; here a malformed first object is skipped, and counted in
  `malformed`); IoU of its mask with the ground truth's; box IoU in [0, 1] coordinates.
- several: the union of all predicted masks against the union of the ground truth's;
  each ground-truth box is matched to the best predicted box of the same label.
An example with no valid object (malformed, inverted or empty box) has IoU 0 and box
IoU 0 and counts as `invalid`; a malformed output never stops the evaluation.

Metrics: miou (mean of the per-example IoUs), ciou (sum of intersections / sum of
unions over all examples, as RefCOCO papers report), boxacc/0.5, boxacc/0.75 (fraction
of ground-truth boxes matched at IoU >= 0.5 / 0.75), invalid (examples without a valid
object), malformed (malformed objects in all outputs), total.
"""

import numpy as np

from paligemma import segmentation
from paligemma.evaluators import base
from paligemma.evaluators import detection

BOX_IOUS = (0.5, 0.75)


def mask_iou_terms(pred, gt):
  """(intersection, union) pixel counts of two bool[H, W] masks."""
  return int(np.sum(pred & gt)), int(np.sum(pred | gt))


def score_example(objects, gt_objects, height, width):
  """dict(iou, intersection, union, box_ious) of one example.

  objects: parsed predictions [{label, box, mask}]; gt_objects: [{label, box, mask}]
  with mask bool[height, width] (see the module docstring for the rules).
  """
  gt_mask = np.zeros((height, width), bool)
  for o in gt_objects:
    gt_mask |= o["mask"]
  if len(gt_objects) == 1:
    objects = objects[:1]
  pred_mask = np.zeros((height, width), bool)
  for o in objects:
    pred_mask |= o["mask"]
  inter, union = mask_iou_terms(pred_mask, gt_mask)
  box_ious = []
  for g in gt_objects:
    same = [o["box"] for o in objects if len(gt_objects) == 1 or o["label"] == g["label"]]
    box_ious.append(max((detection.iou(b, g["box"]) for b in same), default=0.0))
  return dict(iou=inter / union if union else float(not objects), intersection=inter,
              union=union, box_ious=box_ious)


def summarize(scores, invalid, malformed):
  """The metrics dict of a list of `score_example` results."""
  box_ious = [b for s in scores for b in s["box_ious"]]
  union = sum(s["union"] for s in scores)
  out = {"miou": float(np.mean([s["iou"] for s in scores])) if scores else 0.0,
         "ciou": sum(s["intersection"] for s in scores) / union if union else 0.0,
         "invalid": float(invalid), "malformed": float(malformed), "total": float(len(scores))}
  for t in BOX_IOUS:
    out[f"boxacc/{t}"] = float(np.mean([b >= t for b in box_ious])) if box_ious else 0.0
  return out


class SegmentationEvaluator(base.DecodingEvaluator):
  """Metrics: miou, ciou, boxacc/0.5, boxacc/0.75, invalid, ... (see the module docstring)."""
  KEYS = base.DECODE_KEYS + ("vae",)
  DEFAULTS = {**base.DecodingEvaluator.DEFAULTS, "max_decode_len": 24}

  def __init__(self, config, **context):
    super().__init__(config, **context)
    if not self.config.get("vae"):
      raise ValueError(f"Evaluator {self.name!r} needs `vae`: the path of big_vision's "
                       "vae-oid.npz (or \"shapes\" for the demo's VAE).")
    self.vae = segmentation.load_vae(self.config["vae"])

  def _ground_truth(self, ex, height, width):
    if ex.get("objects") is not None:
      return [dict(label=o.get("label", ""), box=np.asarray(o["box"], np.float64),
                   mask=segmentation.read_mask(o["mask"], (height, width)))
              for o in ex["objects"]]
    return segmentation.parse_segmentation(ex.get("suffix") or "", self.vae, height, width)[0]

  def score(self, preds):
    scores, invalid, malformed = [], 0, 0
    for p in preds:
      ex = self.source[p["index"]]
      h, w = detection.image_hw(ex["image"])
      objects, bad = segmentation.parse_segmentation(p["prediction"], self.vae, h, w)
      malformed += bad
      invalid += not objects
      s = score_example(objects, self._ground_truth(ex, h, w), h, w)
      p["iou"] = s["iou"]
      p["boxes"] = [{"label": o["label"], "box": [round(float(v), 1) for v in
                                                  detection.to_pixels(o["box"], h, w)]}
                    for o in objects]
      scores.append(s)
    return summarize(scores, invalid, malformed)

  def record(self, pred):
    """Adds `iou` and `boxes` ([{label, box: pixel y1, x1, y2, x2}])."""
    out = super().record(pred)
    out.update(iou=pred.get("iou", 0.0), boxes=pred.get("boxes", []))
    return out

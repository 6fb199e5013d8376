"""COCO-style object detection (an `instances_*.json` and an image folder) as text.

Each image becomes one example:

  prefix  "detect cat ; dog"
  suffix  "<loc0102><loc0040><loc0620><loc0511> cat ; <loc0300>... dog"

Boxes are COCO pixel [x, y, w, h], clipped to the image (its width/height from the json),
normalised and written y_min, x_min, y_max, x_max with the 1023 binning of
`paligemma.tokenizer`. A box with no area inside its image (w or h <= 0, or wholly outside)
is dropped, not written as a zero-area target: a warning names the file, the count and a
few annotation ids, and `make`'s source keeps the count as `dropped_boxes`.

Options:
  classes          None: every category of the json; or a list of category names to keep
                   (objects of other classes are dropped).
  ask              "present": the prefix names the kept classes present in the image
                   (in `classes` order); "all": it names every kept class, so absent ones
                   teach the model to answer with nothing for them.
  shuffle_objects  False: objects in annotation order; True: in an order drawn from
                   `seed` and the image id (fixed per image, so reproducible).
  skip_crowd       True: ignore `iscrowd` annotations (boxes around groups).
  keep_empty       False: drop images with no kept object when ask="present".

The example also keeps `objects`: [{"label": str, "box": [y1, x1, y2, x2] in [0, 1]}],
for detection metrics. `python -m paligemma.data.coco_to_jsonl` writes these examples as
a jsonl file for reuse.

Config: {"name": "coco_detection", "annotations": "instances_val2017.json",
"images": "val2017/", ...options}.
"""

import logging
import os

import numpy as np

from paligemma import tokenizer
from paligemma.data import sources

ASK = ("present", "all")
_log = logging.getLogger(__name__)


def clip_box(bbox, width, height):
  """[y1, x1, y2, x2] in [0, 1] of a COCO pixel [x, y, w, h] clipped to the image; None if empty."""
  x, y, w, h = (float(v) for v in bbox)
  x1, x2 = max(x, 0.0), min(x + w, float(width))
  y1, y2 = max(y, 0.0), min(y + h, float(height))
  if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
    return None
  return [y1 / height, x1 / width, y2 / height, x2 / width]


def _warn_dropped(annotations, dropped):
  if dropped:
    _log.warning("%s: dropped %d box(es) with no area inside their image (e.g. annotation "
                 "ids %s); the other boxes of those images are kept.", annotations,
                 len(dropped), dropped[:3])


def read(annotations, images, classes=None, ask="present", shuffle_objects=False, seed=0,
         skip_crowd=True, keep_empty=False, segmentations=False):
  """(examples, annotation ids of the dropped empty boxes) of a COCO instances json.

  segmentations=True: each object also keeps its annotation's `segmentation` (polygons
  or RLE, as in the json) and each example its image's `height` and `width`, for
  `paligemma.data.coco_segmentation`."""
  if ask not in ASK:
    raise ValueError(f"`ask` must be one of {ASK}, got {ask!r}.")
  if not os.path.isdir(images):
    raise FileNotFoundError(f"COCO image folder {images!r} not found; set `images`.")
  data = sources.read_json(annotations, ("images", "annotations", "categories"),
                           "COCO instances", "annotations")
  cat_names = {c["id"]: c["name"] for c in data["categories"]}
  if classes is None:
    classes = [cat_names[k] for k in sorted(cat_names)]
  unknown = sorted(set(classes) - set(cat_names.values()))
  if unknown:
    raise ValueError(f"{annotations}: classes {unknown} are not categories of this json; "
                     f"valid: {sorted(set(cat_names.values()))}.")
  rank = {name: i for i, name in enumerate(classes)}
  objects = {}
  for ann in data["annotations"]:
    name = cat_names.get(ann["category_id"])
    if name not in rank or (skip_crowd and ann.get("iscrowd", 0)):
      continue
    if segmentations and not ann.get("segmentation"):
      continue  # No mask to learn from.
    objects.setdefault(ann["image_id"], []).append((name, ann["bbox"], ann.get("id"),
                                                    ann.get("segmentation")))
  out, dropped = [], []
  for img in sorted(data["images"], key=lambda im: im["id"]):
    objs = []
    for name, bbox, ann_id, segmentation in objects.get(img["id"], []):
      box = clip_box(bbox, img["width"], img["height"])
      if box is None:
        dropped.append(ann_id)
        continue
      objs.append({"label": name, "box": box})
      if segmentations:
        objs[-1]["segmentation"] = segmentation
    if shuffle_objects:
      rng = np.random.default_rng([seed, int(img["id"])])
      objs = [objs[i] for i in rng.permutation(len(objs))]
    if ask == "present":
      asked = sorted({o["label"] for o in objs}, key=rank.get)
      if not asked and not keep_empty:
        continue
    else:
      asked = list(classes)
    suffix = tokenizer.detection_string([o["box"] for o in objs], [o["label"] for o in objs])
    out.append(dict(image=os.path.join(images, img["file_name"]),
                    prefix="detect " + " ; ".join(asked), suffix=suffix,
                    id=str(img["id"]), references=[suffix], objects=objs))
    if segmentations:
      out[-1].update(height=img["height"], width=img["width"])
  _warn_dropped(annotations, dropped)
  return out, dropped


def examples(annotations, images, classes=None, ask="present", shuffle_objects=False,
             seed=0, skip_crowd=True, keep_empty=False):
  """list[dict] detection examples of a COCO instances json (see the module docstring)."""
  return read(annotations, images, classes, ask, shuffle_objects, seed, skip_crowd,
              keep_empty)[0]


def make(annotations, images, classes=None, ask="present", shuffle_objects=False, seed=0,
         skip_crowd=True, keep_empty=False):
  """Source of COCO detection examples; `dropped_boxes` counts the empty boxes left out."""
  exs, dropped = read(annotations, images, classes, ask, shuffle_objects, seed, skip_crowd,
                      keep_empty)
  note = f" ({len(dropped)} empty boxes dropped)" if dropped else ""
  source = sources.ListSource(f"coco_detection {annotations}{note}", exs)
  source.dropped_boxes = len(dropped)
  return source

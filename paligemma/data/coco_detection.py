"""COCO-style object detection (an `instances_*.json` and an image folder) as text.

Each image becomes one example:

  prefix  "detect cat ; dog"
  suffix  "<loc0102><loc0040><loc0620><loc0511> cat ; <loc0300>... dog"

Boxes are COCO pixel [x, y, w, h], normalised by the image's width/height from the json
and written y_min, x_min, y_max, x_max with the 1023 binning of `paligemma.tokenizer`.

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

import os

import numpy as np

from paligemma import tokenizer
from paligemma.data import sources

ASK = ("present", "all")


def examples(annotations, images, classes=None, ask="present", shuffle_objects=False,
             seed=0, skip_crowd=True, keep_empty=False):
  """list[dict] detection examples of a COCO instances json (see the module docstring)."""
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
    objects.setdefault(ann["image_id"], []).append((name, ann["bbox"]))
  out = []
  for img in sorted(data["images"], key=lambda im: im["id"]):
    objs = []
    for name, (x, y, w, h) in objects.get(img["id"], []):
      W, H = img["width"], img["height"]
      box = np.clip([y / H, x / W, (y + h) / H, (x + w) / W], 0.0, 1.0)
      objs.append({"label": name, "box": [float(v) for v in box]})
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
  return out


def make(annotations, images, classes=None, ask="present", shuffle_objects=False, seed=0,
         skip_crowd=True, keep_empty=False):
  """Source of COCO detection examples."""
  return sources.ListSource(
      f"coco_detection {annotations}",
      examples(annotations, images, classes, ask, shuffle_objects, seed, skip_crowd, keep_empty))

"""COCO instance masks (an `instances_*.json` and an image folder) as segmentation text.

Each image becomes one example:

  prefix  "segment cat ; dog"
  suffix  "<loc0102><loc0040><loc0620><loc0511><seg012>...<seg097> cat ; <loc0300>... dog"

Objects, classes, order and dropped boxes are as in `paligemma.data.coco_detection` (same
options), keeping only annotations with a `segmentation`. Each object's mask (COCO
polygons or RLE, decoded with pycocotools at the image's size) is encoded inside its
clipped box by the mask VQ-VAE at `vae` (big_vision's `vae-oid.npz`) as big_vision's
`refcoco_mask2str`: 4 loc + 16 seg tokens, then the label. Encoding runs when an
example is read, so building the source only parses the json.

The example keeps `objects`: [{"label", "box": [y1, x1, y2, x2] in [0, 1], "mask": COCO
RLE {"size": [H, W], "counts": str}}], the ground truth of the `segmentation`
evaluator. `python -m paligemma.data.coco_to_jsonl --task segment --vae vae-oid.npz`
writes these examples as a jsonl file.

Config: {"name": "coco_segmentation", "annotations": "instances_val2017.json",
"images": "val2017/", "vae": "vae-oid.npz", ...coco_detection options}.
"""

from paligemma import segmentation as segmentation_lib
from paligemma.data import coco_detection


def to_rle(segmentation, height, width):
  """COCO RLE {"size": [H, W], "counts": str} of an annotation's polygons or RLE."""
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  if isinstance(segmentation, list):  # Polygons: [[x1, y1, x2, y2, ...], ...].
    polygons = [p for p in segmentation if len(p) >= 6]  # A polygon needs 3 points.
    if not polygons:
      raise ValueError(f"COCO segmentation {str(segmentation)[:80]} has no polygon of 3 "
                       "or more points.")
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
    rle = mask_utils.frPyObjects(segmentation, height, width)  # Uncompressed (iscrowd).
  elif isinstance(segmentation, dict):
    rle = dict(segmentation)
  else:
    raise ValueError(f"COCO segmentation must be polygons or RLE, got {type(segmentation)}.")
  counts = rle["counts"]
  return {"size": [int(v) for v in rle["size"]],
          "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def to_mask(segmentation, height, width):
  """bool[H, W] of an annotation's polygons or RLE."""
  return segmentation_lib.read_mask(to_rle(segmentation, height, width), (height, width))


class CocoSegmentationSource:
  """Segmentation examples of COCO instances, encoded when read (see the module docstring)."""

  def __init__(self, name, examples, vae):
    self.name, self._examples = name, examples
    self._encode = segmentation_lib.SuffixEncoder(vae)
    if not examples:
      raise ValueError(f"Data source {name} is empty: no examples found.")

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    ex = dict(self._examples[index])
    h, w = ex.pop("height"), ex.pop("width")
    objects = [{"label": o["label"], "box": o["box"],
                "mask": to_rle(o["segmentation"], h, w)} for o in ex["objects"]]
    masks = [segmentation_lib.read_mask(o["mask"], (h, w)) for o in objects]
    suffix = self._encode(masks, [o["box"] for o in objects], [o["label"] for o in objects])
    ex.update(prefix="segment " + ex["prefix"][len("detect "):], suffix=suffix,
              references=[suffix], objects=objects)
    return ex

  def __repr__(self):
    return f"<{type(self).__name__} {self.name}: {len(self)} examples>"


def make(annotations, images, vae, classes=None, ask="present", shuffle_objects=False, seed=0,
         skip_crowd=True, keep_empty=False):
  """Source of COCO segmentation examples; `dropped_boxes` counts the empty boxes left out."""
  exs, dropped = coco_detection.read(annotations, images, classes, ask, shuffle_objects, seed,
                                     skip_crowd, keep_empty, segmentations=True)
  note = f" ({len(dropped)} empty boxes dropped)" if dropped else ""
  source = CocoSegmentationSource(f"coco_segmentation {annotations}{note}", exs, vae)
  source.dropped_boxes = len(dropped)
  return source

"""RefCOCO-style referring segmentation from a jsonl file: one object per line.

  {"image": "images/0001.jpg", "prefix": "segment the dog on the left", "mask": "masks/0001.png"}

`image` and `mask` are paths relative to the jsonl file's folder (or absolute); the mask
is an image of the same size as `image` whose channel 0 is > 0 inside the object (a
0/255 PNG, as big_vision's RefCOCO masks). `box` ([y1, x1, y2, x2] in [0, 1]) is
optional: by default the tight box of the mask. `id` defaults to "<file>:<line>"; other
keys are kept. The suffix is big_vision's `refcoco_mask2str` of the mask with the VAE at
`vae`: `<loc>`x4 + `<seg>`x16 and no label, as RefCOCO answers are; it is encoded when the
example is read. `objects` ([{"label": "", "box", "mask": path}]) is the ground truth of
the `segmentation` evaluator.

big_vision's refcoco_seg transfer uses the referring sentence as prefix; the released
mix checkpoints also answer `segment <thing>`: write the prefix you want in the file.

Config: {"name": "refcoco", "path": "refcoco_val.jsonl", "vae": "vae-oid.npz"}.
"""

import os

import numpy as np

from paligemma import segmentation
from paligemma.data import jsonl


def mask_box(mask):
  """[y1, x1, y2, x2] in [0, 1]: the tight box of a bool[H, W] mask (None if empty)."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not rows.size:
    return None
  h, w = mask.shape
  return [rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w]


class RefcocoSource:
  """Referring segmentation examples of a jsonl file (see the module docstring)."""

  def __init__(self, path, vae):
    self.name = f"refcoco {path}"
    folder = os.path.dirname(os.path.abspath(path))
    self._examples = jsonl.read(path)
    for ex in self._examples:
      if not isinstance(ex.get("mask"), str):
        raise ValueError(f"{path}: example {ex['id']!r} needs `mask`, the path of its mask "
                         f"image, got {ex.get('mask')!r}.")
      ex["mask"] = os.path.join(folder, ex["mask"])
    if not self._examples:
      raise ValueError(f"Data source {self.name} is empty: no examples found.")
    self._encode = segmentation.SuffixEncoder(vae)

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    ex = dict(self._examples[index])
    if not os.path.isfile(ex["mask"]):
      raise FileNotFoundError(f"{self.name}: mask {ex['mask']!r} of example {ex['id']!r} "
                              "not found.")
    mask = segmentation.read_mask(ex["mask"])
    box = ex.get("box") or mask_box(mask)
    if box is None:
      raise ValueError(f"{self.name}: mask {ex['mask']!r} of example {ex['id']!r} is empty.")
    suffix = self._encode([mask], [box], [""])
    ex.update(suffix=suffix, references=[suffix],
              objects=[{"label": "", "box": [float(v) for v in box], "mask": ex["mask"]}])
    return ex

  def __repr__(self):
    return f"<{type(self).__name__} {self.name}: {len(self)} examples>"


def make(path, vae):
  """Source of the referring segmentation examples in a jsonl file."""
  return RefcocoSource(path, vae)

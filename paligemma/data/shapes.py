"""Synthetic coloured shapes on a plain background, drawn on the fly from a seed.

The default data of the demo and the tests: small enough for a tiny model to learn.
Example i is drawn from `numpy.random.default_rng([seed, i])`, so it is the same on
every machine and at every access; train and evaluation sets use different seeds.

  task="caption"  prefix "caption en", suffix "a red circle"
                  (several shapes: "a red circle and a blue square", top to bottom)
  task="detect"   prefix "detect circle ; square ; triangle" (every shape kind, always),
                  suffix "<loc..>x4 circle ; ..." ordered by kind as in the prefix,
                  then top to bottom
  task="segment"  prefix "segment circle" (the kind of a shape in the image), suffix
                  "<loc..>x4<seg..>x16 circle" for every shape of that kind, top to
                  bottom, joined by " ; "; the 16 codes are the mask encoded by the VAE
                  at `vae` (default "shapes": the demo's VAE, paligemma/assets/
                  shapes_vae.npz, made by `paligemma.assets.make_shapes_vae`)

Shapes do not overlap; each side is a fraction `size` = (low, high) of the image side
(uniform in the range), divided by sqrt(number of shapes). Extra field `objects`:
[{"label", "colour", "box": [y1, x1, y2, x2] in [0, 1]}]; the segment task adds each
object's "mask" (bool[H, W], the shape's own pixels) and keeps only the asked kind.

Config: {"name": "shapes", "task": "caption", "num_examples": 1000, "seed": 0,
"image_size": 224, "max_shapes": 1, "size": [0.3, 0.5], "vae": "shapes"}.
"""

import numpy as np
from PIL import Image, ImageDraw

from paligemma import tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 205, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
TASKS = ("caption", "detect", "segment")


def draw_shape(draw, kind, x, y, side, fill):
  """Draws shape `kind` filling the square of `side` pixels at (x, y) on a PIL ImageDraw."""
  xy = (x, y, x + side - 1, y + side - 1)
  if kind == "circle":
    draw.ellipse(xy, fill=fill)
  elif kind == "square":
    draw.rectangle(xy, fill=fill)
  else:
    draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)


class ShapesSource:
  """Sequence of synthetic shape examples (see the module docstring)."""

  def __init__(self, task="caption", num_examples=1000, seed=0, image_size=224,
               max_shapes=1, colours=tuple(COLOURS), shapes=SHAPES, size=(0.3, 0.5),
               vae="shapes"):
    if task not in TASKS:
      raise ValueError(f"shapes `task` must be one of {TASKS}, got {task!r}.")
    if num_examples < 1:
      raise ValueError(f"shapes `num_examples` must be >= 1, got {num_examples}.")
    if not 1 <= max_shapes <= 4:
      raise ValueError(f"shapes `max_shapes` must be 1..4, got {max_shapes}.")
    if not (len(size) == 2 and 0 < size[0] <= size[1] <= 1):
      raise ValueError(f"shapes `size` must be [low, high] with 0 < low <= high <= 1, got {size}.")
    bad = sorted(set(colours) - set(COLOURS)) + sorted(set(shapes) - set(SHAPES))
    if bad:
      raise ValueError(f"Unknown colour/shape {bad}; valid: {list(COLOURS)}, {list(SHAPES)}.")
    self.name = f"shapes {task} seed={seed}"
    self.task, self.num_examples, self.seed = task, int(num_examples), int(seed)
    self.image_size, self.max_shapes = int(image_size), int(max_shapes)
    self.colours, self.shapes = list(colours), list(shapes)
    self.size = (float(size[0]), float(size[1]))
    if task == "segment":
      from paligemma import segmentation  # pylint: disable=g-import-not-at-top
      # A shape's crop depends only on its kind and side: a run encodes a few dozen.
      self._encode = segmentation.SuffixEncoder(vae, cache=True)

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index):
    if not -self.num_examples <= index < self.num_examples:
      raise IndexError(f"shapes example {index} out of range({self.num_examples}).")
    index %= self.num_examples
    rng = np.random.default_rng([self.seed, index])
    image, objects = self._draw(rng)
    if self.task == "segment":
      kind = objects[int(rng.integers(len(objects)))]["label"]
      objects = sorted((o for o in objects if o["label"] == kind), key=lambda o: o["box"])
      prefix = f"segment {kind}"
      suffix = self._encode([o["mask"] for o in objects], [o["box"] for o in objects],
                            [kind] * len(objects))
    elif self.task == "caption":
      prefix = "caption en"
      objects = sorted(objects, key=lambda o: (o["box"][0], o["box"][1]))
      suffix = " and ".join(f"a {o['colour']} {o['label']}" for o in objects)
    else:
      prefix = "detect " + " ; ".join(self.shapes)
      objects = sorted(objects, key=lambda o: (self.shapes.index(o["label"]), o["box"][0]))
      suffix = tokenizer.detection_string([o["box"] for o in objects],
                                          [o["label"] for o in objects])
    return dict(image=image, prefix=prefix, suffix=suffix, id=f"shapes-{self.seed}-{index}",
                references=[suffix], objects=objects)

  def _draw(self, rng):
    s = self.image_size
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    count = int(rng.integers(1, self.max_shapes + 1))
    scale = 1.0 / np.sqrt(count)
    objects, taken = [], []
    for _ in range(count):
      colour = self.colours[rng.integers(len(self.colours))]
      kind = self.shapes[rng.integers(len(self.shapes))]
      for _ in range(20):  # Rejection-sample a place that overlaps no earlier shape.
        side = int(s * scale * rng.uniform(*self.size))
        y, x = (int(v) for v in rng.integers(0, s - side + 1, size=2))
        if all(y + side <= t[0] or t[2] <= y or x + side <= t[1] or t[3] <= x for t in taken):
          break
      else:
        continue  # No room: fewer shapes.
      taken.append((y, x, y + side, x + side))
      draw_shape(draw, kind, x, y, side, COLOURS[colour])
      box = [y / s, x / s, (y + side) / s, (x + side) / s]
      objects.append({"label": kind, "colour": colour, "box": box})
      if self.task == "segment":
        mask = Image.new("L", (s, s), 0)
        draw_shape(ImageDraw.Draw(mask), kind, x, y, side, 255)
        objects[-1]["mask"] = np.asarray(mask) > 0
    return np.asarray(img, np.uint8), objects


def make(task="caption", num_examples=1000, seed=0, image_size=224, max_shapes=1,
         colours=tuple(COLOURS), shapes=SHAPES, size=(0.3, 0.5), vae="shapes"):
  """Source of synthetic shape examples."""
  return ShapesSource(task, num_examples, seed, image_size, max_shapes, colours, shapes, size,
                      vae)

"""Parsed detections and segmentations drawn on an image: coloured masks, boxes, labels.

  from paligemma import drawing, segmentation
  objects, _ = segmentation.parse_segmentation(text, vae, image.height, image.width)
  drawing.draw_objects(image, objects).save("out.png")

Used by `python -m paligemma.predict --out` and the browser demo. Objects are dicts with
`box` ([y1, x1, y2, x2] in [0, 1]), optional `label` and optional `mask` (bool[H, W] at the
image's size), as `parse_segmentation` gives; detections from
`tokenizer.parse_detections` become such dicts with `detection_objects`.
"""

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
           (70, 240, 240), (245, 130, 48), (240, 50, 230))  # Distinct on photos and white.
MASK_ALPHA = 0.45  # How much of a masked pixel is the object's colour.


def detection_objects(detections):
  """[{"label", "box"}] of `tokenizer.parse_detections` output [(label, box)]."""
  return [{"label": label, "box": box} for label, box in detections]


def draw_objects(image, objects, *, alpha=MASK_ALPHA):
  """A new RGB PIL image: `image` (PIL image or uint8[H, W, 3]) with each object's mask
  blended in its colour, its box outlined and its label written above the box."""
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8))
  image = image.convert("RGB")
  pixels = np.asarray(image, np.float32).copy()
  w, h = image.size
  for i, obj in enumerate(objects):
    mask = obj.get("mask")
    if mask is None:
      continue
    mask = np.asarray(mask, bool)
    if mask.shape != (h, w):
      raise ValueError(f"Mask of shape {mask.shape} for an image of {h}x{w}: parse with the "
                       "image's own height and width.")
    colour = np.asarray(COLOURS[i % len(COLOURS)], np.float32)
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * colour
  out = Image.fromarray(np.round(pixels).astype(np.uint8))
  draw = ImageDraw.Draw(out)
  width = max(1, min(w, h) // 100)
  for i, obj in enumerate(objects):
    colour = COLOURS[i % len(COLOURS)]
    y1, x1, y2, x2 = np.asarray(obj["box"], np.float64) * [h, w, h, w]
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
    if obj.get("label"):
      draw.text((x1 + 2, max(0, y1 - 11)), obj["label"], fill=colour)
  return out

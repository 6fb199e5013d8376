"""Flickr8k captions in the Kaggle layout (`adityajn105/flickr8k`).

  <directory>/captions.txt   CSV with header `image,caption`, about 5 rows per image
                             (split at the first comma: captions may hold unquoted commas)
  <directory>/Images/        the JPEG files named in the `image` column

Split by image, never by caption: the distinct image names, sorted, are permuted by
`seed`; the first `val_size` images form "validation", the next `train_size` (None:
all the rest) form "train". Changing `train_size` therefore never moves an image into
or out of validation. Sizes count images, not captions.

"train" has one example per caption (every caption of an image is seen); "validation"
has one example per image, with all its captions in `references` and the first as
`suffix`. Prefix: `prefix` (default "caption en").

Config: {"name": "flickr8k", "directory": ..., "split": "train", "train_size": 1200,
"val_size": 300, "seed": 0}.
"""

import collections
import os

import numpy as np

from paligemma.data import sources

SPLITS = ("train", "validation")


def _unquote(field):
  """The text of a CSV field: a fully quoted one loses its quotes ("" inside is one ")."""
  inner = field[1:-1]
  if len(field) >= 2 and field[0] == field[-1] == '"' and '"' not in inner.replace('""', ""):
    return inner.replace('""', '"')
  return field


def read_captions(path):
  """OrderedDict image name -> list of captions, from a `image,caption` CSV.

  Each row is split at its first comma (image names have none), so a caption may hold
  commas whether it is quoted (the Kaggle file quotes those) or not.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Flickr8k captions file {path!r} not found; `directory` must hold captions.txt and "
        "Images/ (the Kaggle adityajn105/flickr8k layout).")
  captions = collections.OrderedDict()
  with open(path, encoding="utf-8") as f:
    header = f.readline()
    if not header:
      raise ValueError(f"{path}: empty file; expected a header `image,caption` and rows.")
    if [h.strip() for h in header.split(",")] != ["image", "caption"]:
      raise ValueError(f"{path}:1: header is {header.strip()!r}, expected `image,caption`.")
    for lineno, line in enumerate(f, start=2):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      name, _, caption = (_unquote(part.strip()).strip() for part in line.partition(","))
      if not name or not caption:
        raise ValueError(f"{path}:{lineno}: expected two non-empty fields `image,caption`, "
                         f"got {line!r}.")
      captions.setdefault(name, []).append(caption)
  if not captions:
    raise ValueError(f"{path}: no captions after the header.")
  return captions


def split_images(names, split, train_size, val_size, seed):
  """The image names of one split (see the module docstring for the rule)."""
  if split not in SPLITS:
    raise ValueError(f"Flickr8k split must be one of {SPLITS}, got {split!r}.")
  names = sorted(names)
  order = np.random.default_rng(seed).permutation(len(names))
  shuffled = [names[i] for i in order]
  want = val_size + (train_size or 0)
  if want > len(shuffled) or (train_size is None and val_size >= len(shuffled)):
    raise ValueError(f"Flickr8k has {len(shuffled)} images, too few for val_size={val_size} "
                     f"and train_size={train_size}; lower them.")
  if split == "validation":
    return shuffled[:val_size]
  end = None if train_size is None else val_size + train_size
  return shuffled[val_size:end]


def make(directory, split="train", train_size=None, val_size=300, seed=0, prefix="caption en"):
  """Source of one Flickr8k split."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Flickr8k directory {directory!r} not found.")
  image_dir = os.path.join(directory, "Images")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"{image_dir!r} not found; the Kaggle layout has the JPEGs in Images/.")
  captions = read_captions(os.path.join(directory, "captions.txt"))
  examples = []
  for name in split_images(captions, split, train_size, val_size, seed):
    refs = captions[name]
    path = os.path.join(image_dir, name)
    if split == "train":
      examples += [dict(image=path, prefix=prefix, suffix=c, id=f"{name}#{k}", references=[c])
                   for k, c in enumerate(refs)]
    else:
      examples.append(dict(image=path, prefix=prefix, suffix=refs[0], id=name, references=refs))
  return sources.ListSource(f"flickr8k {split} ({directory})", examples)

"""Throughput of the training input pipeline, in images per second.

  python benchmarks/input_pipeline.py [--source jpeg|shapes] [--image_size 224]
      [--batch_size 32] [--steps 30] [--num_files 256]

`jpeg` (default) writes Flickr8k-sized JPEGs (500x375, quality 90) to a temporary folder
and reads them through the `jsonl` source: file read + TF decode + tokenize + resize +
batch, the path a real fine-tuning run takes. `shapes` draws synthetic images instead.
The first batches (tf.data start-up) are not timed.
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from paligemma import clean_exit  # pylint: disable=g-import-not-at-top
from paligemma import tokenizer  # pylint: disable=g-import-not-at-top
from paligemma.data import pipeline  # pylint: disable=g-import-not-at-top


def write_jpegs(folder, num_files, seed=0):
  """Writes `num_files` 500x375 photo-like JPEGs and a jsonl naming them; returns its path."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:375, 0:500]
  path = os.path.join(folder, "data.jsonl")
  with open(path, "w") as f:
    for i in range(num_files):
      # Smooth gradients plus noise compress like photos, unlike flat colour.
      base = np.stack([xx * rng.uniform(0.2, 0.5), yy * rng.uniform(0.2, 0.6),
                       (xx + yy) * rng.uniform(0.1, 0.3)], -1)
      pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
      f.write(json.dumps({"image": f"{i:05d}.jpg", "prefix": "caption en",
                          "suffix": "a dog runs through the grass"}) + "\n")
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", choices=("jpeg", "shapes"), default="jpeg")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--text_len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--num_files", type=int, default=256)
  args = parser.parse_args()

  tok = tokenizer.load_tokenizer()
  with tempfile.TemporaryDirectory() as folder:
    if args.source == "jpeg":
      source = {"name": "jsonl", "path": write_jpegs(folder, args.num_files)}
    else:
      source = {"name": "shapes", "num_examples": args.num_files, "image_size": 320}
    inp = pipeline.make_train_input(source, tok, image_size=args.image_size,
                                    text_len=args.text_len, batch_size=args.batch_size,
                                    seed=0, process_index=0, process_count=1)
    it = iter(inp)
    for _ in range(args.warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(args.steps):
      next(it)
    elapsed = time.perf_counter() - start
    del it, inp  # Stop the prefetch threads before the folder goes.
  images_per_s = args.steps * args.batch_size / elapsed
  print(f"{args.source}: {images_per_s:.1f} images/s at {args.image_size} px "
        f"(batch {args.batch_size}, {args.steps} batches in {elapsed:.2f} s, "
        f"{os.cpu_count()} CPUs)")


if __name__ == "__main__":
  clean_exit.run(main)

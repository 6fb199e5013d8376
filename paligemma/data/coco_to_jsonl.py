"""Writes COCO detection or segmentation examples as a jsonl file for the `jsonl` source.

  python -m paligemma.data.coco_to_jsonl --annotations instances_val2017.json \\
      --images val2017/ --output val2017_detect.jsonl [--classes cat,dog] \\
      [--ask present|all] [--shuffle_objects] [--seed 0] [--task detect|segment] \\
      [--vae vae-oid.npz]

--task segment writes `segment cat ; dog` examples (`paligemma.data.coco_segmentation`):
every mask is encoded with the VQ-VAE at --vae, and each object keeps its mask as COCO
RLE for the `segmentation` evaluator.

Image paths are written relative to the output file's folder, so the pair can be moved
together. The summary line also counts the boxes dropped for having no area inside their
image (see `paligemma.data.coco_detection`).
"""

import argparse
import os

from paligemma import clean_exit
from paligemma import json_files
from paligemma.data import coco_detection
from paligemma.data import coco_segmentation


def write(output, exs):
  """Writes examples to `output` as jsonl; returns the number written."""
  folder = os.path.dirname(os.path.abspath(output))
  json_files.write_jsonl(output, [
      dict(ex, image=os.path.relpath(os.path.abspath(ex["image"]), folder)) for ex in exs])
  return len(exs)


def main(argv=None):
  parser = argparse.ArgumentParser(description="COCO instances json -> detection or "
                                   "segmentation jsonl.")
  parser.add_argument("--annotations", required=True, help="COCO instances json file.")
  parser.add_argument("--images", required=True, help="Folder of the images it names.")
  parser.add_argument("--output", required=True, help="jsonl file to write.")
  parser.add_argument("--classes", default=None, help="Comma-separated class names to keep.")
  parser.add_argument("--ask", default="present", choices=coco_detection.ASK)
  parser.add_argument("--shuffle_objects", action="store_true")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep_crowd", action="store_true", help="Keep iscrowd boxes.")
  parser.add_argument("--keep_empty", action="store_true", help="Keep images without objects.")
  parser.add_argument("--task", default="detect", choices=("detect", "segment"))
  parser.add_argument("--vae", help="segment: big_vision's vae-oid.npz (the mask VQ-VAE).")
  args = parser.parse_args(argv)
  segment = args.task == "segment"
  if segment and not args.vae:
    parser.error("--task segment needs --vae, the path of big_vision's vae-oid.npz.")
  classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
  exs, dropped = coco_detection.read(args.annotations, args.images, classes, args.ask,
                                     args.shuffle_objects, args.seed, not args.keep_crowd,
                                     args.keep_empty, segmentations=segment)
  if segment:
    source = coco_segmentation.CocoSegmentationSource(args.annotations, exs, args.vae)
    exs = [source[i] for i in range(len(source))]
  n = write(args.output, exs)
  examples_of = f" (e.g. annotation ids {dropped[:3]})" if dropped else ""
  print(f"Wrote {n} examples to {args.output}; dropped {len(dropped)} box(es) with no area "
        f"inside their image{examples_of}.")


if __name__ == "__main__":
  clean_exit.run(main)

"""The README's main command, measured: train the shapes demo, then caption fresh images.

  python benchmarks/shapes_demo.py [--workdir DIR] [--task caption|detect] [--reuse]

Trains `transfers/shapes.py` with `python -m paligemma.train` (unless --reuse and the
workdir already holds params.npz), prints the wall time, the held-out metrics the
trainer logged, and how many of 32 freshly generated images `python -m paligemma.predict`
captions exactly right.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from paligemma import clean_exit  # pylint: disable=wrong-import-position
from paligemma.data import shapes  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "shapes-demo"))
  parser.add_argument("--task", default="caption", choices=("caption", "detect"))
  parser.add_argument("--reuse", action="store_true")
  args = parser.parse_args()
  env = dict(os.environ, PYTHONPATH=REPO)
  if not (args.reuse and os.path.exists(os.path.join(args.workdir, "params.npz"))):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "paligemma.train", "--config",
                    f"transfers/shapes.py:task={args.task}", "--workdir", args.workdir,
                    "--config.progress=False"], cwd=REPO, env=env, check=True)
    print(f"trained in {time.perf_counter() - start:.0f} s (wall, including compilation)")
  with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
    last = json.loads(f.read().splitlines()[-1])
  print("final logged metrics:", {k: round(v, 4) for k, v in last.items()})
  if args.task != "caption":
    return
  source = shapes.make(task="caption", num_examples=32, seed=4242, image_size=32)
  with tempfile.TemporaryDirectory() as folder:
    paths = []
    for i in range(len(source)):
      paths.append(os.path.join(folder, f"{i}.png"))
      Image.fromarray(source[i]["image"]).save(paths[-1])
    out = subprocess.run([sys.executable, "-m", "paligemma.predict", "--checkpoint",
                          args.workdir, "--image", *paths, "--prompt", "caption en"],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True)
  got = [line.split("\t", 1)[1] for line in out.stdout.splitlines()]
  right = sum(g == source[i]["suffix"] for i, g in enumerate(got))
  print(f"predict on fresh images: {right}/{len(got)} exact")


if __name__ == "__main__":
  clean_exit.run(main)

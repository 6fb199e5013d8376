r"""Peak resident memory while loading a float32 .npz, against the file's size.

  python benchmarks/checkpoint_memory.py [--gb 1.2] [--dir /tmp]

Writes a random float32 checkpoint of a medium config (one leaf at a time, so writing
it costs little memory), then loads it with `paligemma.checkpoint.load` in a fresh
process and reports that process's peak RSS (VmHWM) next to its RSS after importing jax
alone; the file is deleted afterwards. Twice: as stored (goal: loading adds < 1.3x the
file) and cast to float16 as the T4 recipe's frozen weights are (goal: loading adds
< 0.65x the file, i.e. the float16 result plus pieces, never the float32 leaf and its
cast copy together). Third, as a QLoRA run loads its frozen base: float16 and its
matmul weights quantized to NF4 a layer at a time (`lora.layer_quantizer`), next to
the result's own size (goal: loading adds little more than the NF4 result).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

# VmHWM (this process's own peak RSS; ru_maxrss would carry the parent's over exec).
_CHILD = r"""
import sys, time
import jax, numpy as np
from paligemma import checkpoint
def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key):
      return int(line.split()[1]) * 1024
jax.devices()
base = status("VmRSS:")
t = time.time()
dtype, kind = (sys.argv[2:] + ["", ""])[:2]
transform = None
if kind:
  from paligemma import lora
  def transform(name, shape):
    lead = lora.quantize_plan(name, shape, kind)
    return lora.layer_quantizer(kind, lead) if lead else None
params, cfg = checkpoint.load(sys.argv[1], dtype=dtype or None, transform=transform)
jax.block_until_ready(params)
size = sum(x.nbytes for x in jax.tree.leaves(params))
print(base, status("VmHWM:"), time.time() - t, size)
"""


def medium_config(gb):
  """A gemma_2b-shaped decoder (width 2048) with as many layers as make ~gb GB."""
  from paligemma.checkpoint import param_shapes  # pylint: disable=g-import-not-at-top
  cfg = {"img": {"variant": "B/16", "image_size": 224},
         "llm": {"variant": "gemma_2b", "depth": 1, "vocab_size": 32_000}}
  per_layer = sum(int(np.prod(s[1:])) for n, s in param_shapes(cfg).items()
                  if n.startswith("llm/layers/")) * 4
  fixed = sum(int(np.prod(s)) for s in param_shapes(cfg).values()) * 4 - per_layer
  cfg["llm"]["depth"] = max(1, int(np.ceil((gb * 1e9 - fixed) / per_layer)))
  return cfg


def write_random(cfg, path):
  from paligemma.checkpoint import param_shapes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, shape in param_shapes(cfg).items():
      arr = rng.standard_normal(shape, np.float32)
      with zf.open(f"params/{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, arr, allow_pickle=False)
      del arr


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--gb", type=float, default=1.2, help="checkpoint size in GB")
  parser.add_argument("--dir", default=tempfile.gettempdir())
  args = parser.parse_args()
  cfg = medium_config(args.gb)
  path = os.path.join(args.dir, "checkpoint_memory_bench.npz")
  try:
    write_random(cfg, path)
    size = os.path.getsize(path)
    runs = {}
    for name, args in (("as stored", []), ("float16", ["float16"]),
                       ("float16, NF4 matmul weights", ["float16", "nf4"])):
      out = subprocess.run([sys.executable, "-c", _CHILD, path] + args,
                           check=True, capture_output=True, text=True).stdout.split()
      runs[name] = int(out[0]), int(out[1]), float(out[2]), int(out[3])
  finally:
    if os.path.exists(path):
      os.remove(path)
  gib = 2**30
  print(f"file {size / gib:.3f} GiB float32 (llm depth {cfg['llm']['depth']})")
  for name, (base, peak, took, result) in runs.items():
    print(f"  load {name}: {took:.1f}s; result {result / gib:.3f} GiB; peak RSS "
          f"{peak / gib:.3f} GiB = {peak / size:.2f}x file; before loading (jax imported) "
          f"{base / gib:.3f} GiB; loading added {(peak - base) / gib:.3f} GiB = "
          f"{(peak - base) / size:.2f}x file")


if __name__ == "__main__":
  main()

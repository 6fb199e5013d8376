"""Shared pieces of the side-by-side benchmarks: presets, timing, the peak-FLOP/s probe.

Each side runs in its own process (`python benchmarks/X.py --side ours|theirs`), one after
the other, so neither framework's threads or memory disturb the other's figures.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

PRESETS = {
    # Runs in minutes on 2 CPU cores; the real vocabulary keeps the output layer honest.
    "cpu-small": dict(
        model=dict(img=dict(variant="Ti/16", image_size=112),
                   llm=dict(variant="gemma_tiny", width=256, depth=4, mlp_dim=1024,
                            num_heads=4, num_kv_heads=1, head_dim=64, vocab_size=257_152)),
        dtype="float32", batch=8, text_len=32, decode_steps=16, steps=5),
    # PaliGemma 2 3B at 224 px, random weights, for an accelerator.
    "gpu-3b": dict(
        model=dict(img=dict(variant="So400m/14", image_size=224),
                   llm=dict(variant="gemma2_2b", final_logits_softcap=None)),
        dtype="bfloat16", batch=16, text_len=128, decode_steps=64, steps=10),
}


def timed(fn, steps, sync):
  """Median seconds of `fn()` over `steps` calls after one warm-up call."""
  sync(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_peak_flops(side, dtype):
  """FLOP/s of a large square matmul on this machine, in the given framework."""
  n = 2048 if os.environ.get("CI") or side == "cpu" else 8192
  if side == "jax":
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    sec = timed(lambda: f(a), 3, jax.block_until_ready)
  else:
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=dev)
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    sec = timed(lambda: a @ a, 3, sync)
  return 2 * n ** 3 / sec


def run_sides(script, preset, out, extra=()):
  """Runs `script --side ours`, then `--side theirs`; prints and appends both + ratios."""
  results = {}
  for side in ("ours", "theirs"):
    cmd = [sys.executable, script, "--preset", preset, "--side", side, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      sys.stderr.write(proc.stderr[-4000:])
      raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{side:>6}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results[side].items()))
  ours, theirs = results["ours"], results["theirs"]
  ratios = {k: ours[k] / theirs[k] for k in ours
            if k in theirs and isinstance(ours[k], float) and theirs[k] and k.endswith("_per_s")}
  ratios.update({k: theirs[k] / ours[k] for k in ours
                 if k in theirs and isinstance(ours[k], float) and ours[k] and k.endswith("_ms")})
  print(" ratio: " + ", ".join(f"{k} ours/theirs={v:.2f}x" for k, v in ratios.items()))
  if out:
    with open(out, "a") as f:
      f.write(json.dumps({"benchmark": os.path.basename(script), "preset": preset,
                          "ours": ours, "theirs": theirs, "ratios": ratios,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
  return results, ratios


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)

"""Shared pieces of the side-by-side benchmarks: presets, timing, FLOP counts, the
peak-FLOP/s probe, and running the two sides.

Each side runs in its own process (`python benchmarks/X.py --side ours|theirs`), one after
the other, so neither framework's threads or memory disturb the other's figures.
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python benchmarks/X.py` from a checkout that is not installed.
  sys.path.insert(0, REPO)

PRESETS = {
    # Runs in minutes on 2 CPU cores; the real vocabulary keeps the output layer honest.
    "cpu-small": dict(
        model=dict(img=dict(variant="Ti/16", image_size=112),
                   llm=dict(variant="gemma_tiny", width=256, depth=4, mlp_dim=1024,
                            num_heads=4, num_kv_heads=1, head_dim=64, vocab_size=257_152)),
        dtype="float32", batch=8, text_len=32, prompt_len=8, decode_steps=16, steps=5),
    # Gemma 2B's layers (two of them) and vocabulary, float32, on a CPU: decoding at the
    # real widths, where the layers' weights, not only the embedding, are read every step
    # (2.9 GB of weights; about a minute a side on 2 cores).
    "cpu-2b-2layers": dict(
        model=dict(img=dict(variant="Ti/16", image_size=112),
                   llm=dict(variant="gemma_2b", depth=2)),
        dtype="float32", batch=2, text_len=32, prompt_len=8, decode_steps=8, steps=2),
    # PaliGemma 2 3B at 224 px, random weights, for an accelerator.
    "gpu-3b": dict(
        model=dict(img=dict(variant="So400m/14", image_size=224),
                   llm=dict(variant="gemma2_2b", final_logits_softcap=None)),
        dtype="bfloat16", batch=16, text_len=128, prompt_len=8, decode_steps=64, steps=10),
}
# --quick: the same preset (model, batch, lengths), fewer repetitions (CI).
QUICK = dict(steps=1, decode_steps=4, repeats=1)


def preset_from_args(name, quick):
  preset = dict(PRESETS[name])
  preset["repeats"] = 3
  if quick:
    preset.update(QUICK)
  return preset


def timed(fn, steps, sync):
  """Median seconds of `fn()` over `steps` calls after one warm-up call."""
  sync(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_peak_flops(framework, dtype, repeats=3):
  """FLOP/s of a large square matmul (2048 on CPU, 8192 on an accelerator) in `framework`
  ("jax" or "torch"), timed in the calling process."""
  if framework == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    sec = timed(lambda: f(a), repeats, jax.block_until_ready)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if dev == "cuda" else 2048
    a = torch.ones((n, n), dtype=getattr(torch, dtype), device=dev)
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    sec = timed(lambda: a @ a, repeats, sync)
  return 2 * n ** 3 / sec


def matmul_flops(fn, *args, while_trips=1):
  """FLOPs of the matmuls and convolutions of `fn(*args)`, from its jaxpr.

  XLA's cost analysis counts a loop body once; here a scan body counts `length` times
  and a while body `while_trips` times (the caller knows the trip count).
  """
  import jax  # pylint: disable=g-import-not-at-top
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr, while_trips)


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _jaxpr_flops(jaxpr, while_trips):
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape  # The kernel: out features x in features x window.
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(rhs) // max(rhs[eqn.params[
          "dimension_numbers"].rhs_spec[0]], 1)
    if name == "cond":
      total += max(_jaxpr_flops(j, while_trips) for j in _sub_jaxprs(eqn.params["branches"]))
      continue
    times = {"scan": eqn.params.get("length", 1), "while": while_trips}.get(name, 1)
    for key, value in eqn.params.items():
      if name == "while" and key != "body_jaxpr":
        continue
      for sub in _sub_jaxprs(value):
        total += times * _jaxpr_flops(sub, while_trips)
  return total


def run_side(script, preset, side, extra=()):
  """Runs `script --preset P --side S ...` in a process of its own; its last stdout line."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
      REPO, os.environ.get("PYTHONPATH")]))}
  cmd = [sys.executable, script, "--preset", preset, "--side", side, *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"{side} side failed (exit {proc.returncode})")
  lines = proc.stdout.strip().splitlines()
  return lines[-1] if lines else ""


def run_sides(script, preset, out, extra=()):
  """Runs `script --side ours`, then `--side theirs`; prints both and the ratios, and
  appends them as one JSON line to `out` (if given)."""
  results = {}
  for side in ("ours", "theirs"):
    results[side] = json.loads(run_side(script, preset, side, extra))
    print(f"{side:>6}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results[side].items()),
          flush=True)
  ours, theirs = results["ours"], results["theirs"]
  shared = [k for k in ours if k in theirs and isinstance(ours[k], float)
            and not k.startswith("peak") and ours[k] and theirs[k]]
  ratios = {k: ours[k] / theirs[k] for k in shared if k.endswith("_per_s")}
  ratios.update({k: theirs[k] / ours[k] for k in shared if k.endswith("_ms")})
  print(" ratio: " + ", ".join(f"{k} ours/theirs={v:.2f}x" for k, v in ratios.items()),
        flush=True)
  if out:
    with open(out, "a") as f:
      f.write(json.dumps({"benchmark": os.path.basename(script), "preset": preset,
                          "quick": "--quick" in extra, "ours": ours, "theirs": theirs,
                          "ratios": ratios, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
              + "\n")
  return results, ratios


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def cli(doc, script, ours, theirs):
  """The command line every side-by-side benchmark shares: --preset, --quick, --out, and
  --side (internal: one side in this process). Returns run_sides' results when it ran
  both sides, None when it ran one."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
  parser.add_argument("--side", choices=("ours", "theirs"))
  parser.add_argument("--quick", action="store_true", help="one timed step (CI)")
  parser.add_argument("--out", help="append the results as one JSON line to this file")
  args = parser.parse_args()
  if args.side:
    preset = preset_from_args(args.preset, args.quick)
    print(json.dumps(ours(preset) if args.side == "ours" else theirs(preset)))
    return None
  results, _ = run_sides(os.path.abspath(script), args.preset, args.out,
                         ["--quick"] if args.quick else [])
  return args, results

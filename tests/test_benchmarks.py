"""The cpu-small benchmarks run end to end (--quick: one timed repetition) and report both
sides: ours (Flax) and theirs (transformers), the ratios, and a JSON line appended."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmarks_common():
  """benchmarks/common.py, loaded from its file (benchmarks/ is scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(
      "benchmarks_common", os.path.join(REPO, "benchmarks", "common.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


common = _benchmarks_common()

# The peer side; looked up, not imported (transformers takes seconds to import).
needs_peer = pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")),
    reason="transformers / torch not installed")


def _run(script, out):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
      REPO, os.environ.get("PYTHONPATH")])), "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--preset",
                         "cpu-small", "--quick", "--out", str(out)],
                        capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  for side in ("ours", "theirs"):
    assert any(l.strip().startswith(f"{side}:") for l in lines), proc.stdout
  assert any(l.strip().startswith("ratio:") for l in lines), proc.stdout
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(records) == 1 and records[0]["benchmark"] == script
  assert records[0]["preset"] == "cpu-small" and records[0]["quick"]
  return proc.stdout, records[0]


@needs_peer
def test_train_step_cpu_small(tmp_path):
  stdout, rec = _run("train_step.py", tmp_path / "results.jsonl")
  for side in ("ours", "theirs"):
    assert rec[side]["examples_per_s"] > 0 and rec[side]["peak_matmul_flops_per_s"] > 0
  assert rec["ratios"]["examples_per_s"] == pytest.approx(
      rec["ours"]["examples_per_s"] / rec["theirs"]["examples_per_s"])
  assert 0 < rec["ours"]["fraction_of_peak"] < 2
  assert "peak:" in stdout


@needs_peer
def test_decode_cpu_small(tmp_path):
  stdout, rec = _run("decode.py", tmp_path / "results.jsonl")
  for side in ("ours", "theirs"):
    for b in (1, 16):
      assert rec[side][f"b{b}_prefill_ms"] > 0 and rec[side][f"b{b}_decode_tokens_per_s"] > 0
  for b in (1, 16):
    assert rec["ratios"][f"b{b}_decode_tokens_per_s"] > 0
    assert 0 < rec["ours"][f"b{b}_fraction_of_peak"] < 2
  assert "batch 16: decode ours/theirs=" in stdout


def test_decode_step_profile_prints_each_part():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "decode_step_profile.py"),
                         "--batch", "16", "--steps", "1"], capture_output=True, text=True,
                        timeout=600, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  ms = {m[0]: float(m[1]) for m in re.findall(r"^  (\w+)\s+([\d.]+) ms", proc.stdout, re.M)}
  assert set(ms) == {"step", "layers", "output_layer", "pick", "embedding_read"}, proc.stdout
  assert all(v > 0 for v in ms.values()) and "GiB/s" in proc.stdout


def test_matmul_flops_counts_scan_bodies_per_step():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  w, x = jnp.ones((10, 8, 8)), jnp.ones((4, 8))
  f = lambda x, w: jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
  assert common.matmul_flops(f, x, w) == 10 * 2 * 4 * 8 * 8
  body = lambda c: (c[0] + 1, c[1] @ w[0])
  g = lambda x: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
  assert common.matmul_flops(g, x, while_trips=3) == 3 * 2 * 4 * 8 * 8


@needs_peer
def test_lora_train_step_cpu_small(tmp_path):
  stdout, rec = _run("lora_train_step.py", tmp_path / "results.jsonl")
  # The same adapters on both sides: PEFT's module list is our targets "peft".
  assert rec["ours"]["trainable_params"] == rec["theirs"]["trainable_params"] > 0
  assert rec["ratios"]["examples_per_s"] > 0
  gib = {m[0]: float(m[1]) for m in re.findall(r"(float16|nf4|int8) ([\d.]+) GiB",
                                               stdout.splitlines()[-1])}
  assert gib["nf4"] < gib["int8"] < gib["float16"], stdout  # PaliGemma 2 3B's frozen base.

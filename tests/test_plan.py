"""The memory planner's byte counts against hand-computed ones on the shapes config, and
the two T4 recipes (Flickr8k, the Colab notebook's) fitting 16 GB."""

import math
import os
import subprocess
import sys

import pytest

from paligemma import config as config_lib
from paligemma import plan as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _transfer(name, arg=None):
  """transfers/<name>.py[:arg], loaded as --config loads it."""
  path = os.path.join(REPO, "transfers", f"{name}.py")
  return config_lib.load(path if arg is None else f"{path}:{arg}")


def _counts(config):
  """{name: count} of every parameter, straight from the model (no planner code)."""
  from paligemma.checkpoint import tree
  from paligemma.models import build
  p = build.abstract_params(build.build_model(config.model))
  return {k: math.prod(v.shape) for k, v in tree.flatten(p).items()}


@pytest.fixture(scope="module")
def config():
  return _transfer("shapes", "evals=False")


def test_full_finetune_bytes(config):
  counts = _counts(config)
  n = sum(counts.values())
  p = plan_lib.make_plan(config, "t4")
  assert p.params_total == p.params_trainable == n
  assert p.param_bytes == 4 * n and p.gradient_bytes == 4 * n
  assert 8 * n <= p.optimizer_bytes <= 8 * n + 64  # Adam: mu and nu, plus a step count.
  assert p.activation_bytes > 0 and p.fits


def test_attention_only_and_frozen_dtype(config):
  counts = _counts(config)
  attn = sum(v for k, v in counts.items() if k.startswith("llm/layers/attn/"))
  c = config.copy_and_resolve_references()
  c.unlock()
  c.schedule, c.frozen_dtype = "attention_only", "bfloat16"
  p = plan_lib.make_plan(c, "t4")
  assert p.params_trainable == attn
  assert p.param_bytes == 4 * attn + 2 * (sum(counts.values()) - attn)
  assert p.gradient_bytes == 4 * attn and 8 * attn <= p.optimizer_bytes <= 8 * attn + 64


def test_fsdp_divides_params_and_suggests_when_too_big(config):
  c = config.copy_and_resolve_references()
  one = plan_lib.make_plan(c, "t4", devices=1)
  four = plan_lib.make_plan(c, "t4", devices=4)
  assert four.batch_per_device == one.batch_per_device // 4
  # fsdp shards each parameter's largest divisible dimension over the 4 devices.
  assert one.param_bytes / 4 <= four.param_bytes < one.param_bytes / 2
  tiny = plan_lib.Plan(**{**one.__dict__, "capacity": 1024})
  assert not tiny.fits
  assert any("accum_steps" in s for s in plan_lib.suggestions(tiny, c))
  assert "fits: NO" in plan_lib.report(tiny, c)


def test_cli(tmp_path):
  # The repository on the path whatever the install (an editable install elsewhere).
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
      REPO, os.environ.get("PYTHONPATH")]))}
  out = subprocess.run([sys.executable, "-m", "paligemma.plan", "--config",
                        f"{REPO}/transfers/shapes.py:evals=False", "--device", "h100-80"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "fits: yes" in out.stdout and "trainable" in out.stdout
  bad = subprocess.run([sys.executable, "-m", "paligemma.plan", "--config",
                        f"{REPO}/transfers/shapes.py", "--device", "k80"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
  assert bad.returncode != 0 and "t4" in bad.stderr


def _attention_only_bytes(config, p):
  """Checks a plan of an attention-only config with float16 frozen weights against the
  parameter counts; returns the number of attention parameters."""
  counts = _counts(config)
  attn = sum(v for k, v in counts.items() if k.startswith("llm/layers/attn/"))
  total = sum(counts.values())
  assert p.params_total == total and p.params_trainable == attn
  assert p.param_bytes == 4 * attn + 2 * (total - attn)  # float32 trained, float16 frozen.
  assert p.gradient_bytes == 4 * attn
  return attn


@pytest.mark.parametrize("recipe,batch,optimizer_per_param", [
    ("flickr8k", 10, 8),   # Adam: mu and nu, float32.
    ("colab_t4", 8, 0),    # Plain SGD: no state (a step count).
])
def test_t4_recipes_fit_16gb(recipe, batch, optimizer_per_param):
  config = _transfer(recipe)
  p = plan_lib.make_plan(config, "t4")
  attn = _attention_only_bytes(config, p)
  # PaliGemma 2 3B: 26 layers x (q 8x2304x256, kv 2x4x2304x256, out 8x256x2304).
  assert attn == 26 * 3 * 8 * 2304 * 256 == 368_050_176
  assert p.params_total == 3_032_094_960 and p.batch_per_device == batch
  assert optimizer_per_param * attn <= p.optimizer_bytes <= optimizer_per_param * attn + 64
  # Remat, per-layer casts of the float16 weights and the chunked output layer keep the
  # activations small; without them this is 40+ GiB.
  assert 0 < p.activation_bytes < 3 * plan_lib.GiB
  assert p.fits and p.total_bytes < 15 * plan_lib.GiB
  assert "fits: yes" in plan_lib.report(p, config)


def test_bfloat16_on_a_t4_is_flagged(config):
  c = config.copy_and_resolve_references()
  c.unlock()
  c.frozen_dtype, c.schedule = "bfloat16", "attention_only"
  big = plan_lib.Plan(params_total=100, params_trainable=10, param_bytes=2 << 30,
                      optimizer_bytes=0, gradient_bytes=0, activation_bytes=1 << 30,
                      capacity=1024, device="t4", devices=1, batch_per_device=4)
  assert "float16 in place of bfloat16" in plan_lib.suggestions(big, c)[0]
  l4 = plan_lib.Plan(**{**big.__dict__, "device": "l4"})
  assert not any("float16 in place" in s for s in plan_lib.suggestions(l4, c))

"""Mesh and per-parameter sharding rules (the 1 vs 4 device training check is in
test_train.py)."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

from paligemma import sharding  # pylint: disable=g-import-not-at-top


class FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_rules():
  mesh = FakeMesh(data=4, model=2)
  spec = lambda rule, shape: sharding.spec_for(mesh, [(".*", rule)], "x/w", shape)
  assert spec("replicate", (8, 8)) == P(None, None)
  assert spec("fsdp", (8, 16)) == P(None, "data")      # Largest divisible dimension.
  assert spec("fsdp", (8, 6)) == P("data", None)       # 6 does not divide by 4.
  assert spec("fsdp", (3, 5)) == P(None, None)         # Nothing divides: replicated.
  assert spec("shard:-1:model", (8, 6)) == P(None, "model")
  assert spec(["shard:0:model", "fsdp"], (16, 8)) == P("model", "data")
  with pytest.raises(ValueError, match="Unknown sharding rule"):
    spec("fsdpp", (8, 8))
  with pytest.raises(ValueError, match="names mesh axis 'expert'"):
    spec("fsdp:expert", (8, 8))
  with pytest.raises(ValueError, match="not divisible"):
    spec("shard:0:model", (3, 8))
  # First matching rule wins; unmatched parameters are replicated.
  rules = [("img/.*", "replicate"), ("llm/.*", "fsdp")]
  assert sharding.spec_for(mesh, rules, "llm/w", (8,)) == P("data")
  assert sharding.spec_for(mesh, rules, "other", (8,)) == P(None)


def test_mesh_one_device_and_errors():
  mesh = sharding.make_mesh([("data", -1)])
  assert mesh.shape == {"data": jax.device_count()}
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh([("data", -1), ("model", -1)])
  with pytest.raises(ValueError, match="does not fit"):
    sharding.make_mesh([("data", 3)], devices=jax.devices() * 2)


def test_distributed_detection(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not sharding.started_as_one_of_many()
  assert sharding.initialize_distributed("auto") is False
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding.started_as_one_of_many()


def test_four_devices_mesh_and_batch():
  code = """
import numpy as np, jax
from paligemma import sharding
mesh = sharding.make_mesh([("data", -1), ("model", 2)])
assert mesh.shape == {"data": 2, "model": 2}, mesh.shape
sh = sharding.param_shardings(mesh, [(".*", ["shard:0:model", "fsdp"])],
                              {"w": np.zeros((4, 6))})["w"]
assert sh.spec == jax.sharding.PartitionSpec("model", "data"), sh.spec
b = sharding.global_batch({"x": np.arange(8.0)}, sharding.batch_sharding(mesh, ["data"]))
assert b["x"].shape == (8,) and len(b["x"].addressable_shards) == 4
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]

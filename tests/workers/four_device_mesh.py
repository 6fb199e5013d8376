"""Worker of tests/test_sharding.py: a 2x2 mesh, rule shardings and a global batch on 4
devices (run with XLA_FLAGS=--xla_force_host_platform_device_count=4); prints ok."""
import numpy as np, jax
from paligemma import clean_exit, sharding


def main():
  mesh = sharding.make_mesh([("data", -1), ("model", 2)])
  assert mesh.shape == {"data": 2, "model": 2}, mesh.shape
  sh = sharding.param_shardings(mesh, [(".*", ["shard:0:model", "fsdp"])],
                                {"w": np.zeros((4, 6))})["w"]
  assert sh.spec == jax.sharding.PartitionSpec("model", "data"), sh.spec
  b = sharding.global_batch({"x": np.arange(8.0)}, sharding.batch_sharding(mesh, ["data"]))
  assert b["x"].shape == (8,) and len(b["x"].addressable_shards) == 4
  print("ok")


clean_exit.run(main)

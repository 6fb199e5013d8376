"""Mesh, per-parameter sharding rules, tensor-parallel presets, KV cache layout and the
distributed switch (training and decoding on 8 devices: test_multidevice.py; two
processes: test_multiprocess.py; 1 vs 4 devices: test_train.py)."""

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
  # "?": where it fits, else nothing (no such axis, or not divisible).
  assert spec("shard:0:model?", (3, 8)) == P(None, None)
  assert spec(["shard:0:model?", "fsdp"], (3, 8)) == P(None, "data")
  assert spec("shard:0:expert?", (8, 8)) == P(None, None)
  assert spec(["shard:-1:model?", "fsdp"], (16, 8)) == P("data", "model")
  # An axis is used once per parameter.
  assert spec(["fsdp", "fsdp"], (8, 8)) == P("data", None)
  with pytest.raises(ValueError, match="not a preset"):
    sharding.spec_for(mesh, "fsdp_typo", "x/w", (8,))
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


def test_mesh_shape_resolves_the_one_free_axis():
  # The one resolution of config.mesh, for the trainer's mesh and the planner's.
  assert sharding.mesh_shape([("data", -1), ("model", 2)], 8) == (["data", "model"], [4, 2])
  assert sharding.mesh_shape([("data", 4), ("model", 2)], 8) == (["data", "model"], [4, 2])
  # No device count (the planner without --devices): the fixed sizes, -1 taking 1.
  assert sharding.mesh_shape([("data", -1), ("model", 2)]) == (["data", "model"], [1, 2])
  with pytest.raises(ValueError, match="must be distinct"):
    sharding.mesh_shape([("data", 2), ("data", 2)], 4)
  with pytest.raises(ValueError, match="does not fit 6 devices"):
    sharding.mesh_shape([("data", -1), ("model", 4)], 6)
  with pytest.raises(ValueError, match="uses 2 of 4 devices"):
    sharding.mesh_shape([("data", 2)], 4)


def test_distributed_detection(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not sharding.started_as_one_of_many()
  assert sharding.initialize_distributed("auto") is False
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding.started_as_one_of_many()


def test_four_devices_mesh_and_batch():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers",
                        "four_device_mesh.py")
  out = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def _specs(mesh, model_config, rules="fsdp_tp"):
  from paligemma.checkpoint import shapes  # pylint: disable=g-import-not-at-top
  return {k: tuple(sharding.spec_for(mesh, rules, k, v))
          for k, v in shapes.param_shapes(model_config).items()}


@pytest.mark.parametrize("llm", ["gemma_2b", "gemma2_2b", "gemma2_27b"])
def test_tensor_parallel_preset_on_released_shapes(llm):
  """v4-32-like mesh (4 data x 4 model): heads, mlp and vocab over "model", fsdp after."""
  mesh = FakeMesh(data=4, model=4)
  specs = _specs(mesh, {"img": {"variant": "So400m/14"}, "llm": {"variant": llm}})
  mlp = "llm/layers/mlp/"
  assert specs[mlp + "gating_einsum"] == (None, None, "data", "model")      # [L, 2, D, F]
  assert specs[mlp + "linear"] == (None, "model", "data")                   # [L, F, D]
  assert specs["llm/layers/attn/attn_vec_einsum/w"] == (None, "model", None, "data")
  assert specs["llm/embedder/input_embedding"] == ("model", "data")         # [V, D]
  if llm == "gemma_2b":  # One kv head: replicated over "model", still fsdp.
    assert specs["llm/layers/attn/kv_einsum/w"] == (None, None, None, "data", None)
  else:
    assert specs["llm/layers/attn/kv_einsum/w"] == (None, None, "model", "data", None)
  assert specs["llm/layers/attn/q_einsum/w"] == (None, "model", "data", None)
  vit = "img/Transformer/encoderblock/"
  mha = vit + "MultiHeadDotProductAttention_0/"
  assert specs[mha + "query/kernel"] == (None, "data", "model", None)       # [L, D, N, H]
  assert specs[mha + "query/bias"] == (None, "model", "data")              # [L, N, H]
  assert specs[mha + "out/kernel"] == (None, "model", None, "data")
  assert specs[vit + "MlpBlock_0/Dense_0/kernel"] == (None, "data", "model")  # 4304 = 4 x 1076
  assert specs[vit + "MlpBlock_0/Dense_1/kernel"] == (None, "model", "data")
  assert specs["img/head/kernel"][1] == "data" or specs["img/head/kernel"][0] == "data"
  # Everything is split at least once, except vectors no axis divides.
  for name, spec in specs.items():
    assert "data" in spec or "model" in spec or name.endswith(("bias", "scale")), name


def test_tensor_parallel_preset_without_model_axis_is_fsdp():
  mesh = FakeMesh(data=8)
  config = {"img": {"variant": "So400m/14"}, "llm": {"variant": "gemma2_2b"}}
  assert _specs(mesh, config, "fsdp_tp") == _specs(mesh, config, "fsdp")
  assert set(_specs(mesh, config, "replicate").values()) <= {(None,) * n for n in range(6)}


def test_tensor_parallel_rules_match_per_layer_names():
  """Unstacked trees (`layers_3`, `encoderblock_3`) get the same split dimensions."""
  mesh = FakeMesh(data=2, model=2)
  for name, shape, want in [
      ("llm/layers_3/attn/q_einsum/w", (8, 64, 16), ("model", "data", None)),
      ("llm/layers_0/mlp/linear", (128, 64), ("model", "data")),
      ("img/Transformer/encoderblock_5/MultiHeadDotProductAttention_0/out/kernel",
       (4, 16, 64), ("model", None, "data")),
  ]:
    assert tuple(sharding.spec_for(mesh, "fsdp_tp", name, shape)) == want, name


def test_batch_spec_falls_back_where_not_divisible():
  # (The KV cache's specs: tests/test_decode.py, test_cache_rows_and_specs.)
  # Batch over two axes where both divide, else the first only, else replicated.
  mesh = FakeMesh(replica=2, data=4)
  axes = ("replica", "data")
  assert sharding.batch_spec(mesh, axes, (16, 3)) == P(("replica", "data"), None)
  assert sharding.batch_spec(mesh, axes, (6, 3)) == P("replica", None)
  assert sharding.batch_spec(mesh, axes, (3, 3)) == P(None, None)


def test_batch_must_split_over_the_batch_axes():
  with pytest.raises(ValueError, match="batch_size 6 must be a multiple of the 4 devices"):
    sharding.batch_sharding(FakeMesh(data=4, model=2), ["data"], batch_size=6)
  with pytest.raises(ValueError, match="not in config.mesh"):
    sharding.batch_sharding(FakeMesh(data=4), ["replica"])


def test_distributed_modes(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert sharding.initialize_distributed(False) is False
  assert sharding.initialize_distributed("False") is False  # From the command line.
  assert sharding.initialize_distributed("AUTO") is False     # Nothing says "several".
  with pytest.raises(ValueError, match="config.distributed"):
    sharding.initialize_distributed("sometimes")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  assert sharding.started_as_one_of_many()


def test_config_takes_mesh_and_rules_from_the_command_line():
  """--config.mesh='[("data", 4), ("model", 2)]' and --config.sharding_strategy=fsdp parse."""
  from paligemma import config as config_lib  # pylint: disable=g-import-not-at-top
  spec, overrides, _ = config_lib.split_argv(
      ["prog", "--config=transfers/shapes.py:evals=False",
       "--config.mesh=[('data', 4), ('model', 2)]", "--config.sharding_strategy=fsdp",
       "--config.distributed=False"])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = config_lib.load(os.path.join(repo, spec), overrides)
  assert c.mesh == [("data", 4), ("model", 2)], c.mesh
  assert c.sharding_strategy == "fsdp" and c.distributed is False, c

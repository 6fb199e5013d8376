"""Worker of tests/test_multidevice.py: shapes runs and sharded decoding on 8 devices.

  python tests/workers/eight_devices.py OUT_DIR SHAPES_ARG RUNS(fsdp,fsdp_tp,...) decode|""

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 from the repository root;
writes OUT_DIR/report_RUNS.json.
"""
import dataclasses, json, sys, time
import jax, numpy as np
from paligemma import clean_exit, config as config_lib, decode, optim, sharding, train
from paligemma.checkpoint import shapes as param_shapes
from paligemma.models import paligemma as model_lib


def main():
  assert jax.device_count() == 8, jax.devices()
  out_dir = sys.argv[1]
  runs = {"fsdp": ([("data", 8)], "fsdp"),
          "fsdp_tp": ([("data", 4), ("model", 2)], "fsdp_tp"),
          "data_parallel": ([("data", 8)], "replicate")}
  report = {}
  for name in filter(None, sys.argv[3].split(",")):
    mesh, rules = runs[name]
    start = time.time()
    config = config_lib.load(f"transfers/shapes.py:{sys.argv[2]}")  # cwd: the repository.
    config.progress, config.log_every, config.ckpt_every = False, 1, 0
    config.mesh, config.sharding_strategy = mesh, rules
    train.train(config, f"{out_dir}/{name}")
    report[f"{name}_seconds"] = time.time() - start
  if sys.argv[4] != "decode":
    with open(f"{out_dir}/report_{sys.argv[3]}.json", "w") as f:
      json.dump(report, f)
    return
  start = time.time()

  # Decoding: a random model with 2 kv heads, so the cache splits over "model" too.
  model_config = dict(
      img=dict(variant="mu/8", width=64, depth=1, mlp_dim=128, num_heads=2, image_size=32),
      llm=dict(variant="gemma_tiny", depth=2, num_heads=4, num_kv_heads=2, vocab_size=512))
  model = model_lib.Model(**model_config)
  rng = np.random.default_rng(0)
  flat = {k: (rng.standard_normal(s) * (1.0 if "embedding" in k else 0.1)).astype(np.float32)
          for k, s in param_shapes.param_shapes(model_config).items()}
  b, t = 8, 8
  lengths = np.array([3, 8, 5, 1, 7, 2, 6, 4])
  real = np.arange(t)[None] < lengths[:, None]
  batch = dict(image=rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32),
               text=np.where(real, rng.integers(3, 512, (b, t)), 0).astype(np.int32),
               mask_ar=np.zeros((b, t), np.int32), mask_input=real.astype(np.int32))
  mesh = sharding.make_mesh([("data", 4), ("model", 2)])
  one = optim.unflatten({k: jax.device_put(v, jax.devices()[0]) for k, v in flat.items()})
  sharded = optim.unflatten({k: jax.device_put(v, sh) for k, v, sh in (
      (k, v, jax.sharding.NamedSharding(mesh, sharding.spec_for(mesh, "fsdp_tp", k, v.shape)))
      for k, v in flat.items())})
  as_list = lambda spec: [list(a) if isinstance(a, tuple) else a for a in spec]
  report["specs"] = {k: as_list(v.sharding.spec) for k, v in optim.flatten(sharded).items()}
  for sampler in ("greedy",):
    decoder = decode.Decoder(model, max_decode_len=6, sampler=sampler, eos_id=None)
    assert decoder.layout(one) is None
    layout = decoder.layout(sharded)
    report["layout"] = dict(layout.mesh.shape)
    want = np.asarray(decoder(one, batch)["tokens"])
    got = np.asarray(decoder(sharded, batch)["tokens"])
    # 6 rows: not divisible by the 4 "data" devices, so the batch stays replicated.
    got6 = np.asarray(decoder(sharded, {k: v[:6] for k, v in batch.items()})["tokens"])
    report[sampler] = dict(want=want.tolist(), got=got.tolist(), got6=got6.tolist())
    cache = jax.eval_shape(lambda p: model.apply({"params": p}, batch["image"], batch["text"],
        batch["mask_ar"], batch["mask_input"], 30, method=model_lib.Model.prefill)[1], one)
    specs = cache.specs(mesh)
    report["cache_specs"] = {f.name: as_list(getattr(specs, f.name)) for f in dataclasses.fields(specs)}
  report["decode_seconds"] = time.time() - start
  with open(f"{out_dir}/report_{sys.argv[3]}.json", "w") as f:
    json.dump(report, f)


clean_exit.run(main)

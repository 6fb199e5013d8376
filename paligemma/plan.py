r"""Memory planner: will this transfer config fit my accelerator? Allocates nothing.

  python -m paligemma.plan --config transfers/flickr8k.py --device t4
  python -m paligemma.plan --config transfers/shapes.py --devices 8 --device h100-80

Works on abstract shapes only: parameters and optimizer state come from `jax.eval_shape`
and the config's mesh and sharding rules (bytes per device); activations and other
temporaries come from XLA's memory analysis of the compiled train step for one device's
share of the batch (compiled for this machine's backend, so a CPU estimate of a GPU run).

bfloat16: XLA's CPU backend has no bfloat16 arithmetic and widens it to float32, whole
stacks of layer weights at a time, and so does XLA on a GPU without bfloat16 units (the
T4). For the T4 the step is compiled as configured, so the plan shows that cost (and
suggests float16); for the other devices it is compiled with float16 in place of
bfloat16 (the same bytes, and native on CPU).
"""

import dataclasses
import math
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from paligemma import config as config_lib
from paligemma import lora as lora_lib
from paligemma import optim
from paligemma import quant
from paligemma import sharding
from paligemma import train
from paligemma.models import build as build_lib
from paligemma.trainer import step as step_lib

GiB = 1 << 30
# Memory one program can use: nominal HBM less what the runtime keeps. JAX on GPU
# preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised (the README says how).
DEVICES = {"t4": 15.0 * GiB, "l4": 22.0 * GiB, "a100-40": 39.0 * GiB, "a100-80": 79.0 * GiB,
           "h100-80": 79.0 * GiB, "v5e": 15.75 * GiB, "rtx4090": 23.0 * GiB}
NO_BFLOAT16 = ("t4",)  # Devices without bfloat16 arithmetic (XLA widens it to float32).
_DEVICE = flags.DEFINE_enum("device", "t4", sorted(DEVICES), "Accelerator to plan for.")
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices (default: the config "
                                "mesh's fixed sizes, else 1).")


@dataclasses.dataclass
class Plan:
  """Bytes per device of each part of a training run."""
  params_total: int
  params_trainable: int
  param_bytes: int
  optimizer_bytes: int
  gradient_bytes: int
  activation_bytes: int
  capacity: int
  device: str
  devices: int
  batch_per_device: int

  @property
  def total_bytes(self):
    return self.param_bytes + self.optimizer_bytes + self.gradient_bytes + self.activation_bytes

  @property
  def fits(self):
    return self.total_bytes <= self.capacity


def _shard_bytes(shapes, mesh, rules):
  """Bytes per device of {name: ShapeDtypeStruct} (or (name, struct) pairs) under the rules."""
  total = 0
  for name, s in (shapes.items() if isinstance(shapes, dict) else shapes):
    spec = sharding.spec_for(mesh, rules, name, s.shape)
    split = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(spec)) if a)
    total += math.ceil(math.prod(s.shape) / split) * jnp.dtype(s.dtype).itemsize
  return total


def _abstract_mesh(config, devices):
  """(AbstractMesh, device count) of config.mesh on `devices` (None: its fixed sizes)."""
  names, sizes = sharding.mesh_shape(list(config.mesh), devices)
  return jax.sharding.AbstractMesh(tuple(sizes), tuple(names)), math.prod(sizes)


def make_plan(config, device="t4", devices=None):
  """Plan for `config` (a transfer ConfigDict) on `devices` x `device`."""
  train.validate(config)
  if device not in DEVICES:
    raise ValueError(f"Unknown device {device!r}; valid: {sorted(DEVICES)}")
  mesh, devices = _abstract_mesh(config, devices)
  model = build_lib.build_model(config.model, lora=config.lora.to_dict())
  compile_dtype = _compile_dtype(device)
  compile_model = model.clone(dtype=compile_dtype(model.dtype),
                              param_dtype=compile_dtype(model.param_dtype))
  res, text_len = config.input.image_size, config.input.text_len
  params = build_lib.abstract_params(model, text_len)
  groups = optim.groups_from_config(config.schedule, config.optim.schedule)
  trainable, frozen = optim.partition(params, groups)
  if config.frozen_dtype:
    frozen = {k: jax.ShapeDtypeStruct(v.shape, config.frozen_dtype) for k, v in frozen.items()}
  quantized = {}
  if model.lora and model.lora.quantize:  # QLoRA: replicated 4/8-bit codes and scales.
    quantized = jax.eval_shape(lambda f: lora_lib.quantize_frozen(dict(f), model.lora.quantize),
                               frozen)
    quantized = {k: v for k, v in quantized.items() if isinstance(v, quant.QArray)}
    frozen = {k: v for k, v in frozen.items() if k not in quantized}
  tx, lr_fns = optim.make_optimizer(config.optim, groups, trainable, 1000)
  opt_state = jax.eval_shape(tx.init, trainable)
  rules = config.sharding_strategy
  # Optimizer leaves shaped like a parameter are sharded like it; the rest (counts) are tiny.
  opt_leaves = [(next((getattr(k, "key", None) for k in path
                       if getattr(k, "key", None) in trainable), "optimizer/state"), leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)]

  data_parallel = math.prod(mesh.shape[a] for a in config.batch_axes)
  per_device = max(1, config.input.batch_size // data_parallel)
  step = step_lib.make_train_step(compile_model, tx, lr_fns[sorted(lr_fns)[0]],
                                  label_smoothing=config.label_smoothing,
                                  accum_steps=min(config.optim.accum_steps, per_device))
  b = per_device
  batch = dict(image=jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32),
               **{k: jax.ShapeDtypeStruct((b, text_len + 1), jnp.int32)
                  for k in ("text", "mask_ar", "mask_loss")})
  recast = lambda tree: jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, compile_dtype(v.dtype)), tree)
  compiled = jax.jit(step, donate_argnums=(0, 2)).lower(
      recast(trainable), {**recast(frozen), **quantized}, recast(opt_state), batch,
      jax.ShapeDtypeStruct((), jnp.int32)).compile()
  memory = compiled.memory_analysis()
  gradient_bytes = _shard_bytes(trainable, mesh, rules)
  # XLA's temporaries hold the gradients too; they are listed on their own line.
  # (The compiled program is one device's, with whole gradients: subtract those.)
  whole_gradients = _shard_bytes(trainable, mesh, "replicate")
  activations = max(int(memory.temp_size_in_bytes) - whole_gradients, 0)
  return Plan(
      params_total=sum(math.prod(v.shape) for v in jax.tree.leaves(params)),
      params_trainable=sum(math.prod(v.shape) for v in trainable.values()),
      param_bytes=_shard_bytes({**trainable, **frozen}, mesh, rules) + _shard_bytes(
          {f"{k}/{i}": a for k, q in quantized.items() for i, a in enumerate(jax.tree.leaves(q))},
          mesh, "replicate"),
      optimizer_bytes=_shard_bytes(opt_leaves, mesh, rules),
      gradient_bytes=gradient_bytes, activation_bytes=activations,
      capacity=int(DEVICES[device]), device=device, devices=devices, batch_per_device=b)


def _compile_dtype(device):
  """dtype -> the dtype to compile the planned step with (see the module docstring)."""
  def fn(dtype):
    out = jnp.dtype(dtype)
    if out == jnp.bfloat16 and device not in NO_BFLOAT16:
      out = jnp.dtype(jnp.float16)
    return out.name if isinstance(dtype, str) else out
  return fn


def _uses_bfloat16(config):
  return "bfloat16" in (config.model.dtype, config.model.param_dtype, config.frozen_dtype)


def suggestions(plan, config):
  """What to change when the plan does not fit, most effective first."""
  out = []
  if plan.device in NO_BFLOAT16 and _uses_bfloat16(config):
    out.append(f"float16 in place of bfloat16 (model.dtype, model.param_dtype, frozen_dtype): "
               f"the {plan.device} has no bfloat16 arithmetic and XLA widens it to float32")
  if plan.activation_bytes > 0.25 * plan.total_bytes:
    if config.model.remat_policy in (None, "none"):
      out.append("--config.model.remat_policy=nothing_saveable (recompute activations)")
    out.append(f"a smaller batch per device ({plan.batch_per_device}): lower "
               "config.input.batch_size, or keep it and raise config.optim.accum_steps")
  if plan.params_trainable > 0.2 * plan.params_total:
    out.append("--config.schedule=attention_only (train llm/layers/attn/* only), or "
               "freeze_vision")
  if not config.frozen_dtype and plan.params_trainable < plan.params_total:
    out.append("--config.frozen_dtype=bfloat16 (float16 on a T4) for the frozen weights")
  if config.model.param_dtype == "float32" and not out:
    out.append("--config.model.param_dtype=bfloat16")
  out.append(f"more devices (--devices {2 * plan.devices}) with an fsdp sharding_strategy")
  return out


def report(plan, config):
  """Human-readable lines of the plan."""
  g = lambda n: f"{n / GiB:7.2f} GiB"
  lines = [
      f"parameters: {plan.params_total:,} total, {plan.params_trainable:,} trainable",
      f"per device ({plan.devices} x {plan.device}, batch {plan.batch_per_device} per device):",
      f"  params              {g(plan.param_bytes)}",
      f"  optimizer state     {g(plan.optimizer_bytes)}",
      f"  gradients           {g(plan.gradient_bytes)}",
      f"  activations + temp  {g(plan.activation_bytes)}",
      f"  total               {g(plan.total_bytes)} of {g(plan.capacity)} usable",
      f"fits: {'yes' if plan.fits else 'NO'}",
  ]
  if not plan.fits:
    lines += ["try:"] + [f"  - {s}" for s in suggestions(plan, config)]
  return lines


def main(argv, config):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}")
  if config is None:
    raise app.UsageError("--config is required, e.g. --config transfers/flickr8k.py")
  plan = make_plan(config, _DEVICE.value, _DEVICES.value)
  print("\n".join(report(plan, config)))


if __name__ == "__main__":
  config_lib.run(main)

"""Device mesh, per-parameter sharding rules and batch sharding, from the config.

  config.mesh = [("data", -1)]            axis name -> size; one -1 takes the rest
  config.sharding_strategy = "fsdp_tp"    a preset name (PRESETS), or [(regex, rule)]: a
                                          rule table (paligemma/rules.py), first full
                                          match on the "/"-joined param name
  config.batch_axes = ["data"]            mesh axes the batch dimension is split over
                                          (the activations' sharding: big_vision's
                                          `sharding_rules`)

A rule is one op or a list of ops applied in order, each on the dimensions still free:
  "replicate"        a full copy on every device
  "fsdp" / "fsdp:AX" split the largest dimension divisible by the size of axis AX
                     (default "data"); replicated where none divides
  "shard:DIM:AX"     split dimension DIM (negative counts from the end) over axis AX;
                     raises if the mesh has no AX or DIM does not divide
  "shard:DIM:AX?"    the same where possible, else a no-op: no AX in the mesh, or DIM
                     not divisible (e.g. Gemma 2B's single kv head over 2 devices)
Parameters no rule matches are replicated (the table gets a last row (".*",
"replicate")). Optimizer state follows its parameter.

Presets (PRESETS):
  "fsdp"       every parameter fsdp over "data" (ZeRO-3 style: weights all-gathered
               layer by layer, gradients reduce-scattered)
  "replicate"  pure data parallelism: every device a full copy
  "fsdp_tp"    tensor parallelism over a "model" axis where config.mesh has one (Megatron
               style: attention heads, kv heads, the mlp hidden dim, the vocabulary rows
               of the tied embedding; the ViT's heads and mlp dim), then fsdp over
               "data" on the largest remaining dimension. Without a "model" axis it is
               exactly "fsdp".
The batch of activations stays on `batch_axes` (replicated over "model"); XLA's sharding
propagation splits the activations of tensor-parallel layers by heads / hidden units.
In decoding the KV cache k, v float[L, B, S, K, H] is split B over `batch_axes` and K over
"model", each only where divisible (`paligemma.models.cache.Cache.shardings`).
"""

import os
import re

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from paligemma import rules as rules_lib

# Environment variables that mean "this process is one of several". (Cloud TPU VMs
# show it only through the metadata server: run pods with --config.distributed=True.)
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS",)

# Tensor-parallel dimensions, as negative indices so that stacked (scan, leading layer
# axis) and per-layer (`layers_3`, `encoderblock_3`) trees share the rules.
_LLM = r"llm/layers(_\d+)?/"
_VIT = r"img/Transformer/encoderblock(_\d+)?/"
_TENSOR_PARALLEL = [
    (r"llm/embedder/input_embedding", "shard:0:model?"),          # [V, D]: vocab rows
    (_LLM + r"attn/(q_einsum|qkv_einsum|kv_einsum)/w", "shard:-3:model?"),  # [.., N|K, D, H]
    (_LLM + r"attn/attn_vec_einsum/w", "shard:-3:model?"),         # [N, H, D]
    (_LLM + r"mlp/gating_einsum", "shard:-1:model?"),              # [2, D, F]
    (_LLM + r"mlp/linear", "shard:-2:model?"),                     # [F, D]
    (_VIT + r"MultiHeadDotProductAttention_0/(query|key|value)/kernel", "shard:-2:model?"),
    (_VIT + r"MultiHeadDotProductAttention_0/(query|key|value)/bias", "shard:-2:model?"),
    (_VIT + r"MultiHeadDotProductAttention_0/out/kernel", "shard:-3:model?"),  # [heads, hd, D]
    (_VIT + r"MlpBlock_0/Dense_0/(kernel|bias)", "shard:-1:model?"),  # [D, M], [M]
    (_VIT + r"MlpBlock_0/Dense_1/kernel", "shard:-2:model?"),         # [M, D]
]
_REPLICATE_THE_REST = [(re.compile(".*"), "replicate")]
PRESETS = {
    "fsdp": [(".*", "fsdp")],
    "replicate": [(".*", "replicate")],
    "fsdp_tp": [(pattern, [op, "fsdp"]) for pattern, op in _TENSOR_PARALLEL] + [(".*", "fsdp")],
}


def _env_int(name):
  try:
    return int(os.environ.get(name, "1"))
  except ValueError:
    return 1


def started_as_one_of_many():
  """True when the environment says several processes run this program together."""
  if any(os.environ.get(k) for k in _MULTI_PROCESS_ENV) or _env_int("JAX_NUM_PROCESSES") > 1:
    return True
  if _env_int("SLURM_NTASKS") > 1 or _env_int("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  # Multi-host TPU slices list every worker, comma-separated.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(mode="auto"):
  """Calls jax.distributed.initialize() where needed (mode "auto"), always (True) or never
  (False); returns whether it did. Must run before any other JAX call.

  JAX reads the coordinator, process count and id from the cluster environment (Cloud
  TPU pods, SLURM, Open MPI, Kubernetes) or from JAX_COORDINATOR_ADDRESS (host:port of
  process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID (any cluster, or one machine).
  """
  if isinstance(mode, str):  # From the command line: "auto", "True", "false", ...
    words = {"auto": "auto", "true": True, "always": True, "1": True, "false": False,
             "never": False, "0": False}
    if mode.lower() not in words:
      raise ValueError(f"config.distributed={mode!r}; valid: 'auto', True, False.")
    mode = words[mode.lower()]
  if not mode or (mode == "auto" and not started_as_one_of_many()):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ.get("JAX_PROCESS_ID", "0")))
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
  jax.distributed.initialize(**kwargs)
  return True


def mesh_shape(axes, num_devices=None):
  """(names, sizes) of config.mesh [(name, size)] on `num_devices`: the one size -1 (at
  most one) takes the devices the others leave. num_devices None: as many as the fixed
  sizes use (a -1 axis gets 1), as when planning for a mesh written out in full."""
  names = [str(a) for a, _ in axes]
  sizes = [int(s) for _, s in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh {axes}: axis names must be distinct.")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {axes}: at most one axis may have size -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  num_devices = known if num_devices is None else num_devices
  if known < 1 or num_devices % known:
    raise ValueError(f"config.mesh {axes} does not fit {num_devices} devices: the product "
                     "of the sizes must divide the device count.")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {axes} uses {int(np.prod(sizes))} of {num_devices} "
                     "devices; set one axis to -1 or make the sizes multiply to the device "
                     "count.")
  return names, sizes


def make_mesh(axes, devices=None):
  """Mesh from [(name, size)], one size may be -1 (the remaining devices)."""
  devices = jax.devices() if devices is None else list(devices)
  names, sizes = mesh_shape(axes, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(sizes)  # Any layout is correct; this one may be slower.
  return Mesh(grid, names)


def _ops(rule):
  return [rule] if isinstance(rule, str) else list(rule)


def resolve_rules(strategy):
  """[(compiled regex, rule)] of config.sharding_strategy (a preset name or (regex, rule)
  pairs), ending with (".*", "replicate") for the parameters no row names."""
  return (rules_lib.table(strategy, PRESETS, "config.sharding_strategy", "(regex, rule)")
          + _REPLICATE_THE_REST)


def spec_for(mesh, strategy, name, shape):
  """PartitionSpec of one parameter (see the module docstring for the rules)."""
  table = resolve_rules(strategy)
  rule = table[rules_lib.first_match(table, name, "config.sharding_strategy")][1]
  spec = [None] * len(shape)
  for op in _ops(rule):
    kind, *args = str(op).split(":")
    if kind == "replicate" and not args:
      continue
    if kind == "fsdp" and len(args) <= 1:
      axis = args[0] if args else "data"
      size = _axis_size(mesh, axis, name)
      free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % size == 0]
      if size > 1 and free and axis not in spec:
        spec[max(free, key=lambda d: (shape[d], -d))] = axis
    elif kind == "shard" and len(args) == 2 and args[0].lstrip("-").isdigit():
      dim, axis = int(args[0]), args[1]
      optional = axis.endswith("?")
      axis = axis.rstrip("?")
      if optional and axis not in mesh.shape:
        continue
      size = _axis_size(mesh, axis, name)
      fits = -len(shape) <= dim < len(shape) and shape[dim] % size == 0
      if fits and spec[dim] is None and axis not in spec:
        spec[dim] = axis
      elif not optional:
        raise ValueError(f"Sharding rule {op!r} for {name} {tuple(shape)}: dimension {dim} "
                         f"does not exist, is taken, or is not divisible by the {size} "
                         f"devices of {axis!r}; write {op + '?'!r} to skip it where it "
                         "does not fit.")
    else:
      raise ValueError(f"Unknown sharding rule {op!r} for {name} in "
                       "config.sharding_strategy; valid: 'replicate', 'fsdp', 'fsdp:AXIS', "
                       "'shard:DIM:AXIS', 'shard:DIM:AXIS?' or a list of them.")
  return P(*spec)


def _axis_size(mesh, axis, name):
  if axis not in mesh.shape:
    raise ValueError(f"Sharding rule for {name} names mesh axis {axis!r}, but config.mesh has "
                     f"only {list(mesh.shape)}.")
  return mesh.shape[axis]


def param_shardings(mesh, strategy, flat_shapes):
  """{name: NamedSharding} for a flat {name: shape-bearing leaf} dict."""
  return {k: NamedSharding(mesh, spec_for(mesh, strategy, k, v.shape))
          for k, v in flat_shapes.items()}


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, batch_axes=("data",), batch_size=None):
  """Sharding of arrays whose leading dimension is the (global) batch; checks that
  `batch_size` (if given) splits evenly over the batch axes."""
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(f"config.batch_axes {list(axes)} names axes not in config.mesh: {missing}.")
  devices = int(np.prod([mesh.shape[a] for a in axes]))
  if batch_size is not None and batch_size % devices:
    raise ValueError(f"config.input.batch_size {batch_size} must be a multiple of the {devices} "
                     f"devices of config.batch_axes {list(axes)} (mesh {dict(mesh.shape)}).")
  return NamedSharding(mesh, P(axes))


def global_batch(local_batch, sharding):
  """Global jax.Arrays from this process's numpy batch (each process holds its rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def _fitting_axes(mesh, axes, size):
  """The longest prefix of `axes` (those in the mesh) whose device count divides `size`."""
  axes = [a for a in ([axes] if isinstance(axes, str) else axes) if a in mesh.shape]
  while axes and size % int(np.prod([mesh.shape[a] for a in axes])):
    axes.pop()
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def batch_spec(mesh, batch_axes, shape, batch_dim=0):
  """PartitionSpec splitting `batch_dim` over `batch_axes` where divisible, else replicated."""
  spec = [None] * len(shape)
  if shape:
    spec[batch_dim] = _fitting_axes(mesh, batch_axes, shape[batch_dim])
  return P(*spec)


def constrain_batch(tree, mesh, batch_axes=("data",)):
  """Inside jit: arrays of `tree` split on their leading (batch) dim where divisible."""
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, batch_spec(mesh, batch_axes, x.shape))), tree)


def mesh_of(tree):
  """The mesh of the first leaf of `tree` sharded over several devices, else None."""
  for x in jax.tree.leaves(tree):
    sh = getattr(x, "sharding", None)
    if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
      return sh.mesh
  return None

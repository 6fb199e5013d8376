"""Device mesh, per-parameter sharding rules and batch sharding, from the config.

  config.mesh = [("data", -1)]            axis name -> size; one -1 takes the rest
  config.sharding_rules = [(regex, rule)] first full match on the "/"-joined param name
  config.batch_axes = ["data"]            mesh axes the batch dimension is split over

A rule is one op or a list of ops applied in order, each on the dimensions still free:
  "replicate"        a full copy on every device
  "fsdp" / "fsdp:AX" split the largest dimension divisible by the size of axis AX
                     (default "data"); replicated where none divides
  "shard:DIM:AX"     split dimension DIM (negative counts from the end) over axis AX
Parameters no rule matches are replicated. Optimizer state follows its parameter.
A "model" axis for tensor parallelism is one more mesh entry plus "shard:DIM:model"
rules (e.g. heads); the batch stays on `batch_axes`.
"""

import os
import re

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Environment variables that mean "this process is one of several".
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _env_int(name):
  try:
    return int(os.environ.get(name, "1"))
  except ValueError:
    return 1


def started_as_one_of_many():
  """True when the environment says several processes run this program together."""
  if any(os.environ.get(k) for k in _MULTI_PROCESS_ENV):
    return True
  if _env_int("SLURM_NTASKS") > 1 or _env_int("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  # Multi-host TPU slices list every worker, comma-separated.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(mode="auto"):
  """Calls jax.distributed.initialize() where needed (mode "auto"), always (True) or never.

  Must run before any other JAX call. JAX reads the coordinator, process count and id
  from the cluster environment (TPU pods, SLURM, Open MPI) or from
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  """
  if mode is False or mode == "never" or (mode == "auto" and not started_as_one_of_many()):
    return False
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ.get("JAX_PROCESS_ID", "0")))
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
  jax.distributed.initialize(**kwargs)
  return True


def make_mesh(axes, devices=None):
  """Mesh from [(name, size)], one size may be -1 (the remaining devices)."""
  devices = jax.devices() if devices is None else list(devices)
  names = [str(a) for a, _ in axes]
  sizes = [int(s) for _, s in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh {axes}: axis names must be distinct.")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {axes}: at most one axis may have size -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known < 1 or len(devices) % known:
    raise ValueError(f"config.mesh {axes} does not fit {len(devices)} devices: the product "
                     "of the sizes must divide the device count.")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh {axes} uses {int(np.prod(sizes))} of {len(devices)} devices; "
                     "set one axis to -1 or make the sizes multiply to the device count.")
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(sizes)  # Any layout is correct; this one may be slower.
  return Mesh(grid, names)


def _ops(rule):
  return [rule] if isinstance(rule, str) else list(rule)


def spec_for(mesh, rules, name, shape):
  """PartitionSpec of one parameter (see the module docstring for the rules)."""
  rule = "replicate"
  for pattern, r in rules:
    if re.fullmatch(pattern, name):
      rule = r
      break
  spec = [None] * len(shape)
  for op in _ops(rule):
    kind, *args = str(op).split(":")
    if kind == "replicate" and not args:
      continue
    if kind == "fsdp" and len(args) <= 1:
      axis = args[0] if args else "data"
      size = _axis_size(mesh, axis, name)
      free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % size == 0]
      if size > 1 and free:
        spec[max(free, key=lambda d: (shape[d], -d))] = axis
    elif kind == "shard" and len(args) == 2:
      dim, axis = int(args[0]), args[1]
      size = _axis_size(mesh, axis, name)
      if not -len(shape) <= dim < len(shape) or shape[dim] % size:
        raise ValueError(f"Sharding rule {op!r} for {name} {tuple(shape)}: dimension {dim} "
                         f"does not exist or is not divisible by the {size} devices of {axis!r}.")
      spec[dim] = axis
    else:
      raise ValueError(f"Unknown sharding rule {op!r} for {name} in config.sharding_rules; valid:"
                       " 'replicate', 'fsdp', 'fsdp:AXIS', 'shard:DIM:AXIS' or a list of them.")
  return P(*spec)


def _axis_size(mesh, axis, name):
  if axis not in mesh.shape:
    raise ValueError(f"Sharding rule for {name} names mesh axis {axis!r}, but config.mesh has "
                     f"only {list(mesh.shape)}.")
  return mesh.shape[axis]


def param_shardings(mesh, rules, flat_shapes):
  """{name: NamedSharding} for a flat {name: shape-bearing leaf} dict."""
  return {k: NamedSharding(mesh, spec_for(mesh, rules, k, v.shape)) for k, v in flat_shapes.items()}


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, batch_axes=("data",)):
  """Sharding of arrays whose leading dimension is the (global) batch."""
  axes = tuple(batch_axes)
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(f"config.batch_axes {list(axes)} names axes not in config.mesh: {missing}.")
  return NamedSharding(mesh, P(axes))


def global_batch(local_batch, sharding):
  """Global jax.Arrays from this process's numpy batch (each process holds its rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}

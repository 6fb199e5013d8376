"""Structure shared by both towers: layer stacking (scan) and rematerialisation."""

import flax.linen as nn
import jax

REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")


def maybe_remat(block_cls, policy):
  """Wraps a block class in `nn.remat` with a named jax.checkpoint policy ("none": no remat)."""
  if policy in (None, "none"):
    return block_cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {policy!r}; valid: {', '.join(REMAT_POLICIES)}")
  # prevent_cse=False is safe (and faster) because the blocks run inside a scan or jit.
  return nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=False)


def scan_layers(block_cls, length, in_axes=0):
  """Stacks `length` copies of a block, parameters on a new leading axis."""
  return nn.scan(block_cls, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=length)

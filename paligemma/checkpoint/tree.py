"""Parameter-tree plumbing: "/"-joined flat names, and stacked <-> per-layer layouts.

Stacked trees keep every layer in one array with the layer on axis 0
(`img/Transformer/encoderblock/...`, `llm/layers/...`); per-layer trees use
`encoderblock_{i}` / `layers_{i}`, as big_vision does without scan.
"""

import re

# The two layer containers: (stacked name, per-layer name regex, per-layer format).
LAYER_GROUPS = (
    ("img/Transformer/encoderblock", re.compile(r"^img/Transformer/encoderblock_(\d+)/"),
     "img/Transformer/encoderblock_{}"),
    ("llm/layers", re.compile(r"^llm/layers_(\d+)/"), "llm/layers_{}"),
)


def flatten(tree, prefix=""):
  """Nested dict -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict) or (hasattr(v, "items") and not hasattr(v, "shape")):
      out.update(flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def unflatten(flat):
  """{"a/b/c": leaf} -> nested dict."""
  tree = {}
  for name, v in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def split_layer(name):
  """"llm/layers_3/mlp/linear" -> ("llm/layers", 3, "mlp/linear"); None if not per-layer."""
  for stacked, pattern, _ in LAYER_GROUPS:
    m = pattern.match(name)
    if m:
      return stacked, int(m.group(1)), name[m.end():]
  return None


def stacked_group(name):
  """"llm/layers/mlp/linear" -> ("llm/layers", "mlp/linear"); None outside layer groups."""
  for stacked, _, _ in LAYER_GROUPS:
    if name.startswith(stacked + "/"):
      return stacked, name[len(stacked) + 1:]
  return None


def per_layer_name(stacked, i, rest):
  fmt = {s: f for s, _, f in LAYER_GROUPS}[stacked]
  return f"{fmt.format(i)}/{rest}"


def stack_layers(params):
  """Per-layer tree (`layers_{i}`) -> stacked tree (`layers`, layer on axis 0)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  flat, groups = {}, {}
  for name, v in flatten(params).items():
    hit = split_layer(name)
    if hit is None:
      flat[name] = v
    else:
      stacked, i, rest = hit
      groups.setdefault(f"{stacked}/{rest}", {})[i] = v
  for name, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"Layers of {name} are not numbered 0..N-1: {sorted(layers)}")
    leaves = [layers[i] for i in range(len(layers))]
    xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
    flat[name] = xp.stack(leaves)
  return unflatten(flat)


def unstack_layers(params):
  """Stacked tree (`layers`, layer on axis 0) -> per-layer tree (`layers_{i}`)."""
  flat = {}
  for name, v in flatten(params).items():
    hit = stacked_group(name)
    if hit is None:
      flat[name] = v
    else:
      for i in range(v.shape[0]):
        flat[per_layer_name(hit[0], i, hit[1])] = v[i]
  return unflatten(flat)


def is_stacked(params):
  """True unless the tree uses per-layer (`layers_{i}`) names."""
  return not any(split_layer(n) for n in flatten(params))

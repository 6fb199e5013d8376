"""A weighted mixture of sources, as one random-access source (big_vision's data mixtures).

  {"name": "mixture", "sources": [
      {"weight": 3, "name": "hf", "path": "diffusers/tuxemon", "suffix": "blip_caption"},
      {"weight": 1, "name": "jsonl", "path": "data/train.jsonl"}]}

Each entry is a source config (any name but another stream) with an optional `weight`
(default 1); weights are relative. The mixture is a fixed sequence in which source k has
c_k places, c_k / sum(c) its share of the weights and c_k >= len(source k): L = sum(c)
places, the smallest length in which every example of every source appears at least
once. Place s of source k is its example s mod len(source k), so a small source is
repeated (upsampled) and every source is seen whole within each epoch of the mixture.

The pipeline shuffles, shards and resumes the mixture by index like any source, so the
order is deterministic from input.seed and a resume is exact (pipeline.py, "Order and
sharding"); one epoch (steps_per_epoch) is L examples. Example ids become
"<k>:<id>" (k: the entry's place in the list), unique across the mixture.
"""

import bisect
import math


class Mixture:
  """Random-access source: place i -> (source k, its example)."""

  def __init__(self, parts, weights):
    if not parts:
      raise ValueError("A data mixture needs at least one source in `sources`.")
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
      raise ValueError(f"Mixture weights must be positive numbers, got {weights}.")
    self.parts, self.weights = parts, [float(w) for w in weights]
    total = sum(self.weights)
    shares = [w / total for w in self.weights]
    # The smallest length in which each source fits whole at its share.
    length = max(math.ceil(len(s) / p) for s, p in zip(parts, shares))
    self.counts = [max(len(s), math.ceil(length * p)) for s, p in zip(parts, shares)]
    self._starts = [0]
    for c in self.counts:
      self._starts.append(self._starts[-1] + c)

  def __len__(self):
    return self._starts[-1]

  def locate(self, index):
    """(k, i): place `index` of the mixture is example i of source k."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"Mixture index {index} out of range({len(self)}).")
    k = bisect.bisect_right(self._starts, index) - 1
    return k, (index - self._starts[k]) % len(self.parts[k])

  def __getitem__(self, index):
    k, i = self.locate(index)
    ex = dict(self.parts[k][i])
    ex["id"] = f"{k}:{ex['id']}"
    return ex

  def __repr__(self):
    shares = ", ".join(f"{s!r} x{c}" for s, c in zip(self.parts, self.counts))
    return f"<Mixture of {len(self)} places: {shares}>"


def make(sources):
  """Mixture of `sources`: a list of source configs, each with an optional `weight`."""
  from paligemma.data import sources as sources_lib  # pylint: disable=g-import-not-at-top
  if isinstance(sources, dict) or not hasattr(sources, "__iter__"):
    raise TypeError("A mixture's `sources` is a list of source configs, each a dict with a "
                    f"`name` and an optional `weight`; got {type(sources).__name__}.")
  parts, weights = [], []
  for k, config in enumerate(sources):
    config = dict(config)
    weight = config.pop("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
      raise ValueError(f"Mixture source {k}: weight={weight!r} must be a number.")
    if config.get("name") == "mixture":
      raise ValueError(f"Mixture source {k} is itself a mixture; list its sources instead.")
    part = sources_lib.make_source(config)
    if getattr(part, "is_stream", False):
      raise ValueError(f"Mixture source {k} ({part!r}) is a stream; mixtures need random "
                       "access: load it without `streaming`.")
    parts.append(part)
    weights.append(weight)
  return Mixture(parts, weights)

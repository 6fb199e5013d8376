"""Hugging Face PEFT LoRA adapters: write ours as one (`save_peft`), apply one on load.

An adapter directory holds adapter_config.json (`r`, `lora_alpha`, `target_modules`, ...)
and adapter_model.safetensors with, per adapted torch Linear `<module>` of the
transformers model, `base_model.model.<module>.lora_A.weight` float[r, in] and
`...lora_B.weight` float[out, r]; PEFT computes W x + (lora_alpha / r) B A x, as ours.

Ours (paligemma/lora.py) is one pair per weight, `<w>_lora_a` float[L, stack.., inputs.., r]
and `<w>_lora_b` float[L, stack.., r, outputs..]. The torch modules of a weight are the
hf names of its names.table entry, module j = index j over the stack axes (k, v of
kv_einsum; gate, up of gating_einsum), and each is the weight's slice with torch's
(out, in) = (its output letters, its input letters), both flattened in the weight's letter
order: the layout the table's to_hf writes (tests/test_checkpoint_peft.py checks it for
every adaptable entry). So A_j = A[j] as [in, r], transposed; B_j = B[j] as [r, out],
transposed.

Trainable token rows (config.lora.tokens, PEFT's trainable_token_indices) are the tensor
`base_model.model.<embed_tokens module>.token_adapter.trainable_tokens_delta` float[n, D]:
despite its name, the rows' values (in the order of the config's indices), which PEFT
also applies to the tied lm_head, as ours does.
"""

import dataclasses
import json
import math
import os
import re

import numpy as np
import safetensors.numpy

from paligemma import lora as lora_lib
from paligemma.checkpoint import hf
from paligemma.checkpoint import names
from paligemma.checkpoint import shapes as shapes_lib
from paligemma.checkpoint import tree
from paligemma.checkpoint.source import CheckpointError, Leaf

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")
_TOKENS_KEY = re.compile(r"base_model\.model\.(.+)\.token_adapter\.trainable_tokens_delta")
_EMBED = "language_model.embed_tokens"  # The canonical module of the embedding.
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "use_rslora": "rank-stabilised LoRA (use_rslora)",
                "lora_bias": "LoRA biases (lora_bias)"}


@dataclasses.dataclass(frozen=True)
class _Target:
  """A weight of ours an adapter can sit on, and its transformers modules."""
  ours: str
  layout: lora_lib.Layout
  shape: tuple  # Per layer.
  templates: tuple  # Canonical module names with `{i}`, one per stack index.
  depth: int

  def modules(self, i):
    return [t.format(i=i) for t in self.templates]

  @property
  def size(self):
    return dict(zip(self.layout.weight, self.shape))

  def prod(self, letters):
    return math.prod(self.size[c] for c in letters)

  def torch_shapes(self, r):
    """The shapes of each of its torch modules' factors: A_j (r, in), B_j (out, r)."""
    return ((r, self.prod(self.layout.inputs)), (self.prod(self.layout.outputs), r))


def _targets(model_config):
  """{our weight name: _Target} for every weight of the model a LoRA adapter can sit on."""
  shapes = shapes_lib.param_shapes(model_config)
  out = {}
  for e in names.table(model_config):
    lay = lora_lib.layout(e.ours)
    if lay is None or not e.layered:
      continue
    out[e.ours] = _Target(e.ours, lay, tuple(shapes[e.ours][1:]),
                          tuple(_module(n) for n in e.hf), names.depth_of(model_config, e.ours))
  return out


def _module(weight_name):
  return weight_name[:-len(".weight")] if weight_name.endswith(".weight") else weight_name


def _input_letters(lay):
  return "".join(c for c in lay.weight if c in lay.inputs)  # The weight's order.


def to_torch(a, b, target):
  """Ours A [..., stack.., inputs.., r], B [..., stack.., r, outputs..] -> torch
  A [..., j, r, in], B [..., j, out, r] (leading layer axes kept)."""
  lay = target.layout
  lead = a.ndim - len(lay.a)
  order = [lay.a.index(c) for c in lay.stack + _input_letters(lay) + "r"]
  a = a.transpose(tuple(range(lead)) + tuple(lead + p for p in order))
  n_stack, r = target.prod(lay.stack), a.shape[-1]
  a = a.reshape(a.shape[:lead] + (n_stack, -1, r)).swapaxes(-1, -2)
  b = b.reshape(b.shape[:lead] + (n_stack, r, -1)).swapaxes(-1, -2)
  return a, b


def from_torch(a, b, target):
  """The inverse of `to_torch`."""
  lay, size = target.layout, target.size
  lead = a.ndim - 3
  r = a.shape[-2]
  inputs = _input_letters(lay)
  a = a.swapaxes(-1, -2).reshape(
      a.shape[:lead] + tuple(size[c] for c in lay.stack + inputs) + (r,))
  cur = lay.stack + inputs + "r"
  a = a.transpose(tuple(range(lead)) + tuple(lead + cur.index(c) for c in lay.a))
  b = b.swapaxes(-1, -2).reshape(
      b.shape[:lead] + tuple(size[c] for c in lay.stack) + (r,) +
      tuple(size[c] for c in lay.outputs))
  return a, b


# ---- ours -> PEFT ----------------------------------------------------------------------------

def _target_modules(model_config, adapted):
  """PEFT's target_modules for the set of adapted module templates: the short names
  (["q_proj", ...]) when they select exactly these modules, else a regex that does (in
  transformers 4 and 5 spellings alike)."""
  every = {_module(t) for e in names.table(model_config) for t in e.hf}
  short = {t.rsplit(".", 1)[1] for t in adapted}
  if {t for t in every if t.rsplit(".", 1)[1] in short} == set(adapted):
    return sorted(short)
  patterns = []
  for t in sorted(adapted):
    tower, rest = t.split(".", 1)
    # `(\w+\.)?`: transformers 4's `vision_model.` / `model.` inside the tower.
    patterns.append(rf".*{tower}\.(\w+\.)?" + re.escape(rest).replace(re.escape("{i}"), r"\d+"))
  return "|".join(patterns)


def _stacked_flat(params):
  flat = tree.flatten(params)
  if any(tree.split_layer(n) for n in flat):
    flat = tree.flatten(tree.stack_layers(tree.unflatten(flat)))
  return flat


def save_peft(params, model_config, directory, base=None):
  """Writes the adapter leaves of `params` as a PEFT LoRA adapter directory; returns bytes.

  params: nested or flat ("/"-joined) tree, stacked or per-layer, holding `*_lora_a` /
  `*_lora_b` leaves (other leaves are ignored). model_config: its "lora" entry
  (LoraConfig.to_dict()) gives rank, alpha and dropout. base: base_model_name_or_path
  (the transformers base the adapter applies to), written as given.
  `peft.PeftModel.from_pretrained(PaliGemmaForConditionalGeneration.from_pretrained(base),
  directory)` then computes our Model's logits.
  """
  if not model_config.get("lora"):
    raise CheckpointError("save_peft: model_config has no 'lora' entry (rank, alpha, ...); "
                          "pass the config the adapter was trained with")
  lora = lora_lib.LoraConfig.from_dict(model_config["lora"])
  leaves = lora_lib.adapters(_stacked_flat(params))
  if not leaves:
    raise CheckpointError("save_peft: params hold no adapter leaves (`<weight>_lora_a` / "
                          "`_lora_b`); train with config.lora, or pass the adapter leaves")
  targets = _targets(model_config)
  tensors, adapted = {}, []
  token_ids = _save_tokens(leaves.pop(lora_lib.TOKENS_LEAF, None), lora, model_config, tensors)
  for w in sorted({lora_lib.base_name(n) for n in leaves}):
    a_name, b_name = (w + s for s in lora_lib.SUFFIXES)
    missing = [n for n in (a_name, b_name) if n not in leaves]
    if missing:
      raise CheckpointError(f"save_peft: adapter leaf {missing[0]} is missing (its pair is "
                            "there)")
    t = targets.get(w)
    if t is None:
      raise CheckpointError(f"save_peft: {w} has no transformers Linear module to adapt in "
                            "PEFT; adapt only: " + ", ".join(sorted(targets)))
    want = t.layout.shapes((t.depth,) + t.shape, lora.rank)
    for n, shape in zip((a_name, b_name), want):
      if tuple(leaves[n].shape) != tuple(shape):
        raise CheckpointError(f"save_peft: {n} has shape {tuple(leaves[n].shape)}, but rank "
                              f"{lora.rank} and the model_config imply {tuple(shape)}")
    a, b = to_torch(np.asarray(leaves[a_name]), np.asarray(leaves[b_name]), t)
    for i in range(t.depth):
      for j, module in enumerate(t.modules(i)):
        key = _PREFIX + names.module_hf_name(module)
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a[i, j])
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b[i, j])
    adapted += t.templates
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, WEIGHTS_FILE)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  hf._umask_mode(path)  # pylint: disable=protected-access
  config = dict(
      peft_type="LORA", task_type=None, auto_mapping=dict(
          base_model_class="PaliGemmaForConditionalGeneration",
          parent_library="transformers.models.paligemma.modeling_paligemma"),
      base_model_name_or_path=None if base is None else os.fspath(base), revision=None,
      inference_mode=True, r=lora.rank, lora_alpha=_number(lora.alpha),
      lora_dropout=lora.dropout,
      target_modules=_target_modules(model_config, adapted) if adapted else [],
      trainable_token_indices=token_ids, bias="none", fan_in_fan_out=False,
      modules_to_save=None, init_lora_weights=True,
      layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
      use_rslora=False, use_dora=False, lora_bias=False)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)
  return sum(x.nbytes for x in tensors.values())


def _save_tokens(rows, lora, model_config, tensors):
  """Puts the trainable token rows into `tensors`; their ids (a list), or None."""
  if rows is None:
    return None
  ids = lora_lib.token_ids(lora.tokens, model_config["llm"]["vocab_size"])
  if tuple(rows.shape) != (len(ids), model_config["llm"]["width"]):
    raise CheckpointError(f"save_peft: {lora_lib.TOKENS_LEAF} has shape {tuple(rows.shape)}, "
                          f"but lora.tokens and the model_config imply "
                          f"{(len(ids), model_config['llm']['width'])}")
  key = f"{_PREFIX}{names.module_hf_name(_EMBED)}.token_adapter.trainable_tokens_delta"
  tensors[key] = np.ascontiguousarray(rows)
  return list(ids)


def _number(x):
  return int(x) if float(x).is_integer() else float(x)


# ---- PEFT -> ours ----------------------------------------------------------------------------

@dataclasses.dataclass
class Adapter:
  """A PEFT adapter read into our layout: {our adapter leaf name: stacked array}."""
  path: str
  lora: lora_lib.LoraConfig
  leaves: dict


def _read_config(directory):
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file; a PEFT adapter directory holds "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE}")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{path}: not valid JSON: {e}") from None
  if cfg.get("peft_type") != "LORA":
    raise CheckpointError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA "
                          "adapters (\"LORA\") can be applied")
  for key, what in _UNSUPPORTED.items():
    if cfg.get(key):
      raise CheckpointError(f"{path}: {key} is set: {what} adapters are not supported; "
                            "only plain LoRA (W + lora_alpha / r * B A)")
  for key in ("rank_pattern", "alpha_pattern"):
    if cfg.get(key):
      raise CheckpointError(f"{path}: {key} {cfg[key]} gives modules their own rank or alpha; "
                            "only one r and lora_alpha for all modules is supported")
  if (cfg.get("bias") or "none") != "none":
    raise CheckpointError(f"{path}: bias is {cfg['bias']!r}: adapters that train biases are "
                          "not supported (only bias \"none\")")
  if cfg.get("modules_to_save"):
    raise CheckpointError(f"{path}: modules_to_save is {cfg['modules_to_save']!r}: adapters "
                          "that also train whole modules are not supported")
  if "r" not in cfg:
    raise CheckpointError(f"{path}: no 'r' (the LoRA rank)")
  return path, cfg


def _weights_path(directory):
  path = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.exists(path):
    pickled = os.path.join(directory, "adapter_model.bin")
    if os.path.exists(pickled):
      raise CheckpointError(hf.refuse_pickle_message(pickled))
    raise CheckpointError(f"{path}: no such file; a PEFT adapter directory holds "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE}")
  return path


def read_adapter(directory, model_config):
  """PEFT adapter directory -> Adapter for the model of `model_config` (our names, stacked,
  file dtype). Modules the file does not adapt get zeros (PEFT's layers_to_transform, or
  k without v), so the weights it touches at all carry complete leaves."""
  directory = os.fspath(directory)
  if os.path.basename(directory) in (CONFIG_FILE, WEIGHTS_FILE) and os.path.isfile(directory):
    directory = os.path.dirname(directory) or "."
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: no such adapter directory (a PEFT adapter directory "
                          f"holds {CONFIG_FILE} and {WEIGHTS_FILE})")
  config_path, cfg = _read_config(directory)
  path = _weights_path(directory)
  r = int(cfg["r"])
  targets = _targets(model_config)
  index = {}  # Canonical module name -> (target, layer, stack index).
  for t in targets.values():
    for i in range(t.depth):
      for j, m in enumerate(t.modules(i)):
        index[m] = (t, i, j)
  templates = {tpl for t in targets.values() for tpl in t.templates}
  found = {}  # our weight -> {(layer, j, factor): tensor}
  rows = None
  for key, tensor in hf._read_header(path).items():  # pylint: disable=protected-access
    if _TOKENS_KEY.fullmatch(key):
      rows = _read_tokens(key, tensor, cfg, model_config, path)
      continue
    m = _KEY.fullmatch(key)
    if m is None:
      what = ("a DoRA magnitude vector: DoRA adapters are not supported"
              if "lora_magnitude_vector" in key else
              "not a LoRA factor of a Linear module (base_model.model.<module>.lora_A/B.weight)")
      raise CheckpointError(f"{path}: tensor {key!r} is {what}")
    module = names.canonical_hf_name(m.group(1))
    if module not in index:
      template = _LAYER.sub(".layers.{i}.", module, count=1)
      if template in templates:
        depth = next(t.depth for t in targets.values() if template in t.templates)
        why = f"the base model has {depth} layers there (an adapter for another model?)"
      else:
        why = ("an unsupported target module; supported: the language model's "
               "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, SigLIP's "
               "self_attn.{q,k,v,out}_proj and mlp.fc{1,2}")
      raise CheckpointError(f"{path}: tensor {key!r}: module {module!r} is {why}")
    t, i, j = index[module]
    factor = m.group(2)
    a_shape, b_shape = t.torch_shapes(r)
    want = a_shape if factor == "lora_A" else b_shape
    if tuple(tensor.shape) != want:
      raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, but "
                            f"{want} fits the base model with r={r} ({config_path}); an "
                            "adapter for another model?")
    found.setdefault(t.ours, {})[(i, j, factor)] = tensor
  if not found and rows is None:
    raise CheckpointError(f"{path}: no LoRA tensors")
  if cfg.get("trainable_token_indices") and rows is None:
    raise CheckpointError(f"{path}: trainable_token_indices is set ({config_path}) but the "
                          "file has no token_adapter.trainable_tokens_delta tensor")
  leaves = {}
  tokens = ()
  if rows is not None:
    tokens, leaves[lora_lib.TOKENS_LEAF] = rows
  for w, got in found.items():
    t = targets[w]
    for (i, j, factor) in got:
      other = (i, j, "lora_B" if factor == "lora_A" else "lora_A")
      if other not in got:
        key = _PREFIX + names.module_hf_name(t.modules(i)[j]) + f".{other[2]}.weight"
        raise CheckpointError(f"{path}: tensor {key!r} is missing (its pair is there)")
    dtype = np.result_type(*[x.dtype for x in got.values()])
    a_shape, b_shape = t.torch_shapes(r)
    n_stack = len(t.templates)
    a = np.zeros((t.depth, n_stack) + a_shape, dtype)
    b = np.zeros((t.depth, n_stack) + b_shape, dtype)
    for (i, j, factor), tensor in got.items():
      (a if factor == "lora_A" else b)[i, j] = tensor.read()
    leaves[w + lora_lib.SUFFIXES[0]], leaves[w + lora_lib.SUFFIXES[1]] = from_torch(a, b, t)
  lora = lora_lib.LoraConfig(rank=r, alpha=float(cfg.get("lora_alpha", 8)),
                             dropout=float(cfg.get("lora_dropout") or 0.0),
                             targets=_targets_regex(model_config, set(found)),
                             tokens=tokens)
  return Adapter(directory, lora, leaves)


def _read_tokens(key, tensor, cfg, model_config, path):
  """(sorted token ids, their rows float[n, D] in that order) of a trainable-tokens tensor."""
  module = names.canonical_hf_name(_TOKENS_KEY.fullmatch(key).group(1))
  if module != _EMBED:
    raise CheckpointError(f"{path}: tensor {key!r}: trainable tokens of {module!r}; only "
                          "the language model's embed_tokens (tied to lm_head) can have them")
  ids = cfg.get("trainable_token_indices")
  if isinstance(ids, dict):  # {module name: ids}: the embedding's is the one there can be.
    ids = next(iter(ids.values())) if len(ids) == 1 else None
  if not ids or not all(isinstance(i, int) for i in ids):
    raise CheckpointError(f"{path}: tensor {key!r} needs trainable_token_indices, a list of "
                          f"token ids, in {CONFIG_FILE}; it is "
                          f"{cfg.get('trainable_token_indices')!r}")
  vocab, width = model_config["llm"]["vocab_size"], model_config["llm"]["width"]
  if tuple(tensor.shape) != (len(ids), width) or not all(0 <= i < vocab for i in ids):
    raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} for "
                          f"{len(ids)} token ids up to {max(ids)}; the base model has a "
                          f"vocabulary of {vocab} and width {width} (an adapter for another "
                          "model?)")
  if len(set(ids)) != len(ids):
    raise CheckpointError(f"{path}: trainable_token_indices repeats a token id")
  order = np.argsort(ids)
  return tuple(int(ids[i]) for i in order), np.asarray(tensor.read())[order]


def _targets_regex(model_config, weights):
  """config.lora.targets selecting exactly `weights`: a preset when one does, else names."""
  every = shapes_lib.param_shapes(model_config)
  for preset in lora_lib.TARGETS:
    cfg = lora_lib.LoraConfig(rank=1, alpha=1.0, targets=preset)
    if {n for n in every if cfg.targets_weight(n)} == weights:
      return preset
  return "|".join(re.escape(w) for w in sorted(weights))


def apply(src, expected, model_config, directory, merge=True, dtype_for=None):
  """The loader's `adapter=`: (Source, expected shapes, model_config) with a PEFT adapter
  merged into the base leaves, or, merge=False, its leaves added and model_config["lora"]
  set. dtype_for(name) -> the dtype the loader returns a leaf in (default: the file's).

  Merging is lora.merge's W + alpha / r * A B in float32, one layer at a time, straight
  into the returned dtype, so the host holds no more than a load without adapter does.
  """
  adapter = read_adapter(directory, model_config)
  origin = os.path.join(adapter.path, WEIGHTS_FILE)
  leaves = dict(src.leaves)
  expected = dict(expected)
  if not merge:
    for name, arr in adapter.leaves.items():
      expected[name] = arr.shape
      leaves[name] = Leaf(arr.shape, arr.dtype, lambda start=None, stop=None, arr=arr:
                          np.array(arr[start:stop]), f"{origin}: adapter "
                          f"{name}", partial=True)
    model_config = dict(model_config, lora=adapter.lora.to_dict())
    return dataclasses.replace(src, leaves=leaves), expected, model_config
  if lora_lib.TOKENS_LEAF in adapter.leaves:
    leaves[lora_lib.EMBEDDING] = _with_rows(leaves[lora_lib.EMBEDDING], adapter, origin,
                                            dtype_for)
  for a_name in [n for n in adapter.leaves if n.endswith(lora_lib.SUFFIXES[0])]:
    w = lora_lib.base_name(a_name)
    a, b = adapter.leaves[a_name], adapter.leaves[w + lora_lib.SUFFIXES[1]]
    base = leaves[w]
    want = np.dtype(dtype_for(w) if dtype_for else base.dtype)

    def read(start=None, stop=None, base=base, a=a, b=b, lay=lora_lib.layout(w), want=want):
      rows = base.read(start, stop)
      out = rows if rows.dtype == want else np.empty(rows.shape, want)
      for k in range(rows.shape[0]):  # One layer at a time: float32 temporaries stay small.
        i = (start or 0) + k
        delta = lora_lib.delta_weight(a[i], b[i], lay, adapter.lora.scale)
        out[k] = np.asarray(rows[k], np.float32) + np.asarray(delta)
      return out

    leaves[w] = dataclasses.replace(base, read=read,
                                    origin=f"{base.origin} + adapter {origin}")
  return dataclasses.replace(src, leaves=leaves), expected, model_config


def _with_rows(base, adapter, origin, dtype_for):
  """The embedding leaf `base` with the adapter's trainable token rows written in."""
  rows = adapter.leaves[lora_lib.TOKENS_LEAF]
  ids = np.asarray(lora_lib.token_ids(adapter.lora.tokens, base.shape[0]))
  want = np.dtype(dtype_for(lora_lib.EMBEDDING) if dtype_for else base.dtype)

  def read(start=None, stop=None):
    table = np.array(base.read(start, stop), want)
    lo = start or 0
    inside = (ids >= lo) & (ids < lo + table.shape[0])
    table[ids[inside] - lo] = rows[inside]
    return table

  return dataclasses.replace(base, read=read, origin=f"{base.origin} + token rows {origin}")

"""LoRA: trainable low-rank updates of frozen weights, W x + (alpha / rank) * B A x.

A targeted weight `<name>` (our parameter names, paligemma/checkpoint/names.py) gets two
sibling leaves `<name>_lora_a` and `<name>_lora_b` (qwix's naming). Their layout follows
the weight's, from the letters in LAYOUTS (per layer; a scanned stack adds its layer
axis in front of all three):

  A = [stack..., inputs..., r]   B = [stack..., r, outputs...]

`inputs` are the weight's axes contracted with the activations, `outputs` the others in
the weight's order, and `stack` the axes holding separate projections that get one
adapter each, as PEFT's per-module adapters do (q, k, v of `qkv_einsum`; gate and up of
`gating_einsum`). A starts as PEFT's (kaiming-uniform over its inputs), B at zero, so a
fresh adapter leaves the model's outputs unchanged.

config.lora (transfer configs), all optional but `rank`:
  rank      r; 0 or None: no LoRA.
  alpha     the update is scaled by alpha / rank (PEFT's lora_alpha; default rank).
  dropout   on the adapter's input while training (PEFT's lora_dropout), default 0.
  targets   a preset of TARGETS or a regex over parameter names (full match).
  quantize  None | "int8" | "nf4": store the frozen matmul weights so (QLoRA is "nf4").
  tokens    token ids whose embedding rows train too (PEFT's trainable_token_indices):
            a list of ids, or "loc" (the 1024 `<locNNNN>` tokens), "seg" (the 128
            `<segNNN>`), "loc+seg"; default none. The rows are the leaf TOKENS_LEAF
            float[n, D], starting as the base's rows; they replace those rows of the
            embedding in the input and in the tied output layer alike (as PEFT ties them).
            New tokens, such as a caption model's `<loc>` rows on a detection task, need
            them: the base's rows of tokens it never saw are noise, and frozen.
"""

import dataclasses
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

from paligemma import quant

_ATTN = r"llm/layers/attn/(q|kv|qkv|attn_vec)_einsum/w"
_MLP = r"llm/layers/mlp/(gating_einsum|linear)"
_VIT = "img/Transformer/encoderblock/"
_VIT_QKV = _VIT + r"MultiHeadDotProductAttention_0/(query|key|value)/kernel"
_VIT_ALL = _VIT + r"(MultiHeadDotProductAttention_0/(query|key|value|out)|MlpBlock_0/Dense_[01])/kernel"
TARGETS = {
    # PEFT's PaliGemma recipe names q/k/v/o_proj and gate/up/down_proj, which also match
    # SigLIP's q/k/v_proj: "peft" is what its adapters touch, "llm" the language model only.
    "llm": f"{_ATTN}|{_MLP}",
    "peft": f"{_ATTN}|{_MLP}|{_VIT_QKV}",
    "all": f"{_ATTN}|{_MLP}|{_VIT_ALL}",
}
DEFAULT_TARGETS = "llm"
QUANTIZE = (None, "int8", "nf4")

# (name regex, weight letters, stack letters, input letters), per layer.
LAYOUTS = (
    (r"llm/layers/attn/q_einsum/w", "NDH", "", "D"),
    (r"llm/layers/attn/kv_einsum/w", "SKDH", "S", "D"),
    (r"llm/layers/attn/qkv_einsum/w", "SNDH", "S", "D"),
    (r"llm/layers/attn/attn_vec_einsum/w", "NHD", "", "NH"),
    (r"llm/layers/mlp/gating_einsum", "SDF", "S", "D"),
    (r"llm/layers/mlp/linear", "FD", "", "F"),
    (_VIT + r"MultiHeadDotProductAttention_0/(query|key|value)/kernel", "DHK", "", "D"),
    (_VIT + r"MultiHeadDotProductAttention_0/out/kernel", "HKD", "", "HK"),
    (_VIT + r"MlpBlock_0/Dense_0/kernel", "DM", "", "D"),
    (_VIT + r"MlpBlock_0/Dense_1/kernel", "MD", "", "M"),
)
SUFFIXES = ("_lora_a", "_lora_b")
EMBEDDING = "llm/embedder/input_embedding"
TOKENS_PARAM = "input_embedding_lora_tokens"  # The trainable token rows, in llm/embedder.
TOKENS_LEAF = "llm/embedder/" + TOKENS_PARAM
_LORA_LEAF = re.compile(r".*_lora_(a|b|tokens)")
# The loc and seg tokens are the vocabulary's last 1024 + 128 (Gemma's 257152 and the tiny
# tokenizer's alike; paligemma/tokenizer.py).
_NUM_LOC, _NUM_SEG = 1024, 128
TOKEN_PRESETS = ("loc", "seg", "loc+seg")


def token_ids(tokens, vocab_size):
  """Sorted token ids of config.lora.tokens (a preset or ids) in a vocabulary of
  `vocab_size`; raises naming an id out of range."""
  if not tokens:
    return ()
  if isinstance(tokens, str):
    loc = range(vocab_size - _NUM_LOC - _NUM_SEG, vocab_size - _NUM_SEG)
    seg = range(vocab_size - _NUM_SEG, vocab_size)
    ids = {"loc": loc, "seg": seg, "loc+seg": [*loc, *seg]}[tokens]
  else:
    ids = [int(i) for i in tokens]
  if isinstance(tokens, str) and vocab_size < _NUM_LOC + _NUM_SEG:
    raise ValueError(f"config.lora.tokens={tokens!r}: a vocabulary of {vocab_size} has no "
                     "loc/seg tokens")
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"config.lora.tokens: token id {bad[0]} is not in the vocabulary of "
                     f"{vocab_size}")
  return tuple(sorted(set(ids)))


def embedding_table(embedding, rows, ids):
  """The embedding float[V, D] with the rows `ids` replaced by `rows` float[n, D] (the
  trainable token rows, TOKENS_LEAF), in the embedding's dtype; `embedding` when rows
  is None. Gradients reach `rows` and not the embedding's other rows."""
  if rows is None:
    return embedding
  return embedding.at[jnp.asarray(ids, jnp.int32)].set(rows.astype(embedding.dtype))


def embed(embedding, rows, ids, tokens):
  """embedding[tokens] float[..., D], the tokens `ids` (sorted) taking their row from
  `rows` float[n, D] (rows None: none). The same as indexing embedding_table, without
  forming it: the gradient reaches `rows` by a gather of n rows, not a [V, D] scatter."""
  x = jnp.take(embedding, tokens, axis=0)
  if rows is None:
    return x
  ids = jnp.asarray(ids, jnp.int32)
  pos = jnp.clip(jnp.searchsorted(ids, tokens), 0, ids.shape[0] - 1)
  hit = (ids[pos] == tokens)[..., None]
  return jnp.where(hit, jnp.take(rows, pos, axis=0).astype(x.dtype), x)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one weight's adapter is laid out (see the module docstring)."""
  weight: str
  stack: str
  inputs: str

  @property
  def outputs(self):
    return "".join(c for c in self.weight if c not in self.stack + self.inputs)

  @property
  def a(self):
    return self.stack + self.inputs + "r"

  @property
  def b(self):
    return self.stack + "r" + self.outputs

  def shapes(self, weight_shape, rank):
    """(A shape, B shape) for a weight of `weight_shape` (leading layer axes kept)."""
    lead = tuple(weight_shape[:len(weight_shape) - len(self.weight)])
    size = dict(zip(self.weight, weight_shape[len(lead):]))
    size["r"] = rank
    return (lead + tuple(size[c] for c in self.a), lead + tuple(size[c] for c in self.b))


def canonical_name(name):
  """Unstacked layer names (`layers_3`, `encoderblock_0`) -> the stacked spelling."""
  return re.sub(r"/(layers|encoderblock)_\d+/", r"/\1/", name)


def layout(name):
  """The Layout of a weight name, or None if it cannot carry an adapter."""
  name = canonical_name(name)
  for pattern, weight, stack, inputs in LAYOUTS:
    if re.fullmatch(pattern, name):
      return Layout(weight, stack, inputs)
  return None


def is_lora_leaf(name):
  return bool(_LORA_LEAF.fullmatch(name))


def base_name(name):
  """`<w>_lora_a` / `<w>_lora_b` -> `<w>`."""
  return name[:-len(SUFFIXES[0])]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """A resolved config.lora (hashable: it is a field of the model)."""
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS
  quantize: str | None = None
  tokens: str | tuple = ()

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f"config.lora.rank must be a positive integer, got {self.rank!r}")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"config.lora.dropout must be in [0, 1), got {self.dropout!r}")
    if self.quantize not in QUANTIZE:
      raise ValueError(f"config.lora.quantize {self.quantize!r} unknown; valid: {QUANTIZE}")
    if isinstance(self.tokens, str) and self.tokens not in TOKEN_PRESETS:
      raise ValueError(f"config.lora.tokens {self.tokens!r} unknown: a list of token ids or "
                       f"one of {TOKEN_PRESETS}")
    if not isinstance(self.tokens, str):  # The rows are kept in id order.
      object.__setattr__(self, "tokens", tuple(sorted({int(i) for i in self.tokens})))
    try:
      re.compile(self.regex)
    except re.error as e:
      raise ValueError(f"config.lora.targets {self.targets!r} is neither a preset "
                       f"({', '.join(TARGETS)}) nor a valid regex: {e}") from None

  @classmethod
  def from_dict(cls, cfg):
    """LoraConfig from config.lora (a dict or ConfigDict), or None when rank is 0/None."""
    if cfg is None or isinstance(cfg, cls):
      return cfg
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"Unknown config.lora key(s) {unknown}; valid: rank, alpha, dropout, "
                       "targets, quantize, tokens")
    if not cfg.get("rank"):
      return None
    rank = int(cfg["rank"])
    alpha = cfg.get("alpha")
    return cls(rank=rank, alpha=float(rank if alpha is None else alpha),
               dropout=float(cfg.get("dropout") or 0.0),
               targets=cfg.get("targets") or DEFAULT_TARGETS, quantize=cfg.get("quantize"),
               tokens=cfg.get("tokens") or ())

  def to_dict(self):
    out = dataclasses.asdict(self)
    out["tokens"] = out["tokens"] if isinstance(out["tokens"], str) else list(out["tokens"])
    return out

  @property
  def scale(self):
    return self.alpha / self.rank

  @property
  def regex(self):
    return TARGETS.get(self.targets, self.targets)

  def targets_weight(self, name):
    """Whether the weight `name` carries an adapter (it matches and has a Layout)."""
    name = canonical_name(name)
    return bool(re.fullmatch(self.regex, name)) and layout(name) is not None


def init_a(fan_in):
  """PEFT's A init: kaiming-uniform with a = sqrt(5), i.e. uniform(+-1 / sqrt(fan_in)),
  fan_in the size of the weight's input axes."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class DeltaSpecs(NamedTuple):
  """The einsum operands of an adapter's B A x: x, A, U = A x, B and the output y."""
  x: str
  a: str
  u: str
  b: str
  y: str


def delta_specs(eqn, lay):
  """DeltaSpecs of the adapter on a module einsum `eqn` ("x,w->y") of a weight laid out
  as `lay`: U = [stack.., x's axes but the inputs.., r], so that U = einsum("x,A->U") and
  y = einsum("U,B->y")."""
  lhs, rest = eqn.split(",")
  rhs, out = rest.split("->")
  if rhs.replace("...", "") != lay.weight:
    raise ValueError(f"einsum {eqn!r} does not use the weight letters {lay.weight!r}")
  u = lay.stack + "".join(c for c in lhs.replace("...", ".") if c not in lay.inputs) + "r"
  return DeltaSpecs(x=lhs, a=lay.a, u=u.replace(".", "..."), b=lay.b, y=out)


def delta_weight(a, b, lay, scale):
  """(alpha / rank) * A B in the weight's layout (leading layer axes kept)."""
  eqn = f"...{lay.a},...{lay.b}->...{lay.weight}"
  return scale * jnp.einsum(eqn, a.astype(jnp.float32), b.astype(jnp.float32))


def merge(params, lora_config):
  """Flat {name: array} with adapters -> the same without them, each adapted weight
  replaced by W + (alpha / rank) * A B (in W's dtype), and the trainable token rows
  written into the embedding. Quantized weights cannot be merged into: dequantize them
  first (paligemma/quant.py)."""
  out = {k: v for k, v in params.items() if not is_lora_leaf(k)}
  if TOKENS_LEAF in params:
    e = out[EMBEDDING]
    out[EMBEDDING] = embedding_table(e, params[TOKENS_LEAF],
                                     token_ids(lora_config.tokens, e.shape[0]))
  for name in sorted(k for k in params if k.endswith(SUFFIXES[0])):
    w_name = base_name(name)
    if w_name not in out:
      raise KeyError(f"Adapter {name} has no base weight {w_name} to merge into")
    lay = layout(w_name)
    w = out[w_name]
    d = delta_weight(params[name], params[w_name + SUFFIXES[1]], lay, lora_config.scale)
    out[w_name] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
  return out


def adapters(params):
  """The adapter leaves of a flat params dict."""
  return {k: v for k, v in params.items() if is_lora_leaf(k)}


def quantize_plan(name, shape, kind):
  """`lead` for quant.quantize of a frozen weight (its layer axes and the stack axes of
  its layout, so that the model can take one layer, and one projection, as a QArray),
  or None when the weight stays as it is (not a matmul weight of LAYOUTS, or no whole
  blocks)."""
  lay = layout(name)
  if kind is None or lay is None or not lay.weight.startswith(lay.stack):
    return None
  lead = len(shape) - len(lay.weight) + len(lay.stack)
  return lead if quant.quantizable(shape, lead) else None


def quantize_frozen(frozen, kind, target=None):
  """Flat {name: array} -> the same with the matmul weights as quant.QArray (`kind`
  "int8" | "nf4"), one leaf at a time, and a stacked leaf one layer at a time: a
  layer's float32 copy is the only temporary, and each full-precision leaf is released
  once quantized (when the caller holds no other reference). target: the sharding the
  quantized arrays are put on (the accelerator, where the float weights were loaded
  into host memory); None: where each weight is. Other leaves, and those quantized
  already (`layer_quantizer` while loading), stay as they are."""
  out = {}
  for name in list(frozen):
    w = frozen.pop(name)
    lead = None if isinstance(w, quant.QArray) else quantize_plan(name, w.shape, kind)
    if lead is None:
      out[name] = w
    elif lead == 0:
      out[name] = _quantize_jit(w if target is None else jax.device_put(w, target), kind, 0)
    else:
      quantize = layer_quantizer(kind, lead, target)
      out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *map(quantize, w))
    del w
  return out


def layer_quantizer(kind, lead, target=None):
  """The function quantizing one layer (one index of the leading axis) of a frozen weight
  whose quantize_plan is `lead` >= 1, put on `target` first (None: where it is); for
  checkpoint.load(transform=), which then holds one layer in host memory at a time."""
  put = (lambda x: x) if target is None else (lambda x: jax.device_put(x, target))
  return lambda layer: _quantize_jit(put(layer), kind, lead - 1)


_quantize_jit = jax.jit(quant.quantize, static_argnums=(1, 2))

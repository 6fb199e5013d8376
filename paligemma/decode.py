"""Batched decoding through the KV cache: greedy, sampling, beam search, best-of-n.

Axis letters: B batch, T prompt tokens, L max_decode_len, V vocabulary, K beams or
samples per example.

  decoder = Decoder(model, max_decode_len=32, sampler="nucleus(p=0.9)")
  out = decoder(params, batch, seed=0)            # batch: image, text, mask_ar, mask_input
  texts = decoder.texts(tokenizer, out)           # cut at eos

One compiled program per input shape: the image + prompt prefill and the token loop
(a `lax.while_loop`) run inside a single `jax.jit`, which stops as soon as every
example has emitted eos (or after L tokens). Params are an argument of the compiled
function, never a constant in it. Nothing leaves the device inside the loop, so inputs
sharded over a mesh stay sharded (jit propagates the batch sharding).

Sharded decoding: with params sharded over a mesh (as the trainer leaves them; or
`Decoder(..., mesh=mesh)`), the inputs are split over `batch_axes` and the KV cache
k, v float[L, B, S, K, H] over the batch (B on `batch_axes`) and the kv heads (K on
`model_axis`), each where divisible and replicated otherwise (`Cache.shardings`). The
tokens are those of unsharded decoding.

The model returns features (`Model.prefill`, `Model.extend`); the decoder applies the
tied output layer to them (`gemma.tied_logits`), on a CPU through the embedding
transposed from a few rows up (`Decoder._output_head`).

Prompts are right-padded (`paligemma.prompt.assemble(..., mode="eval")`); every example
keeps its own RoPE positions and attends only its real tokens, so an example decodes to
the same tokens whatever else is in the batch.

Samplers (`parse_sampler` reads a spec string as in a config):
  "greedy"                       argmax
  "temperature(t=0.7)"           sample softmax(logits / t); t = 0 is greedy
  "topk(k=40, t=1.0)"            sample among the k most likely tokens
  "nucleus(p=0.9, t=1.0)"        sample among the smallest set with probability >= p
  "beam(n=4)"                    beam search, n beams, ranked by total log-probability
  "best_of_n(n=4, t=1.0, k=0, p=1.0)"  n samples per example, the most likely is kept
Positional arguments work too: "nucleus(0.9)", "beam(4)".

Outputs (numpy-convertible jax arrays):
  tokens    int32[B, L]    generated tokens, eos included, pad (0) after it
  logprobs  float32[B, L]  the model's log-probability of each token (temperature 1,
                           no filtering), 0 after eos
  scores    float32[B]     sum of logprobs
  lengths   int32[B]       number of generated tokens, eos included
Sampling is reproducible for a given (seed, batch); unlike greedy and beam search, a
sample depends on the example's row in the batch (each row draws its own key).
"""

import ast
import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp

from paligemma import sharding
from paligemma import tokenizer as tokenizer_lib
from paligemma.models import gemma
from paligemma.models import layers
from paligemma.models.paligemma import Model

KINDS = ("greedy", "temperature", "topk", "nucleus", "beam", "best_of_n")
# Argument names of each kind's spec string, in positional order.
_ARGS = {"greedy": (), "temperature": ("t",), "topk": ("k", "t"), "nucleus": ("p", "t"),
         "beam": ("n",), "best_of_n": ("n", "t", "k", "p")}
_FIELDS = {"t": "temperature", "k": "top_k", "p": "top_p", "n": "n"}


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen; see the module docstring for the spec strings."""
  kind: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0          # 0: no top-k filtering.
  top_p: float = 1.0      # 1.0: no nucleus filtering.
  n: int = 1              # Beams (beam) or samples per example (best_of_n).

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown sampler {self.kind!r}; valid: {', '.join(KINDS)}.")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.n < 1:
      raise ValueError(f"Bad sampler settings {self}: need temperature >= 0, top_k >= 0, "
                       "0 < top_p <= 1, n >= 1.")


def parse_sampler(spec):
  """A `Sampler` from a spec string ("nucleus(p=0.9)"), a dict, a Sampler or None (greedy)."""
  if spec is None:
    return Sampler()
  if isinstance(spec, Sampler):
    return spec
  if isinstance(spec, dict) or hasattr(spec, "keys"):
    return Sampler(**dict(spec))
  try:
    node = ast.parse(str(spec).strip(), mode="eval").body
  except SyntaxError:
    node = None
  name = node.id if isinstance(node, ast.Name) else (
      node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None)
  if name not in KINDS:
    forms = ", ".join(f"{k}({', '.join(v)})" for k, v in _ARGS.items())
    raise ValueError(f"Sampler spec {spec!r} not understood; use one of {forms}.")
  kwargs = {}
  if isinstance(node, ast.Call):
    names = _ARGS[name]
    if len(node.args) > len(names):
      raise ValueError(f"Sampler {spec!r}: {name} takes at most {len(names)} arguments {names}.")
    try:
      given = [(names[i], ast.literal_eval(a)) for i, a in enumerate(node.args)]
      given += [(kw.arg, ast.literal_eval(kw.value)) for kw in node.keywords]
    except ValueError:
      raise ValueError(f"Sampler {spec!r}: arguments must be numbers.") from None
    for arg, value in given:
      if arg not in names:
        raise ValueError(f"Sampler {spec!r}: {name} has no argument {arg!r}; valid: {names}.")
      kwargs[_FIELDS[arg]] = value
  return Sampler(name, **kwargs)


def filter_logits(logits, temperature, top_k=0, top_p=1.0):
  """float32[B, V] logits scaled by 1/temperature, with top-k / nucleus tails at -inf.

  temperature > 0, top_k (0: off) and top_p (1: off) may be traced scalars, so one
  compiled program serves every setting.
  """
  logits = logits / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  kth = jnp.take(sorted_logits, jnp.maximum(top_k, 1) - 1, axis=1)[:, None]
  keep = (top_k <= 0) | (logits >= kth)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep a token while the mass before it is < p: the smallest set reaching p.
  before = jnp.cumsum(probs, axis=-1) - probs
  cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1)
  keep &= (top_p >= 1) | (logits >= cutoff[:, None])
  return jnp.where(keep, logits, -jnp.inf)


def argmax(logits):
  """int32[B]: jnp.argmax(logits, -1), the first of tied maxima, of float32[B, V].

  Blocked: the max of each block of a few logits, the first block that holds the
  largest, then the first index in that block. Inside the decode loop on XLA's CPU
  backend this is faster than one (value, index) reduction over the whole vocabulary
  (measured: 10-14% off a greedy step at batch 16, vocabulary 257k).
  """
  b, v = logits.shape
  size = next((c for c in (32, 16, 8) if v % c == 0), None)
  if size is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  blocks = logits.reshape(b, v // size, size)
  block = jnp.argmax(jnp.max(blocks, axis=2), axis=1)
  within = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
  return (block * size + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def token_logprob(logits, token):
  """float32[B]: log_softmax(logits)[b, token[b]], without the [B, V] log-softmax."""
  chosen = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return chosen - jax.nn.logsumexp(logits, axis=-1)


def choose(rng, logits, settings):
  """int32[B] next tokens from float32[B, V] logits; settings None is greedy, else
  (temperature, top_k, top_p), where temperature 0 is greedy too."""
  greedy = argmax(logits)
  if settings is None:
    return greedy
  t, k, p = settings
  keys = jax.random.split(rng, logits.shape[0])  # One key per row.
  filtered = filter_logits(logits, jnp.where(t > 0, t, 1.0), k, p)
  sampled = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
  return jnp.where(t > 0, sampled, greedy)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where decoding's arrays live: the batch on `batch_axes`, kv heads on `model_axis`."""
  mesh: jax.sharding.Mesh
  batch_axes: tuple = ("data",)
  model_axis: str = "model"

  def batch(self, tree):
    return sharding.constrain_batch(tree, self.mesh, self.batch_axes)


def _unconstrained(tree):
  return tree


class Decoder:
  """Compiled batched decoding for one model, sampler and max_decode_len.

  mesh: lay the batch and the KV cache out over it (see the module docstring); None:
  the mesh of the params where they are sharded, else one device.
  """

  def __init__(self, model, *, max_decode_len, sampler="greedy",
               eos_id=tokenizer_lib.EOS_ID, pad_id=tokenizer_lib.PAD_ID, mesh=None,
               batch_axes=("data",), model_axis="model"):
    if max_decode_len < 1:
      raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}.")
    self.model = model
    self.max_decode_len = int(max_decode_len)
    self.sampler = parse_sampler(sampler)
    self.eos_id = eos_id  # None: never stop early (benchmarks).
    self.pad_id = pad_id
    self.mesh = mesh
    self.batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    self.model_axis = model_axis
    self._head = None  # (weak reference to an embedding, its transpose): _output_head.

  def layout(self, params):
    """The `Layout` used for `params` (None: unsharded)."""
    mesh = self.mesh if self.mesh is not None else sharding.mesh_of(params)
    if mesh is None:
      return None
    return Layout(mesh, self.batch_axes, self.model_axis)

  def _rows(self, batch):
    """Rows decoded side by side: examples x beams or samples."""
    s = self.sampler
    return len(batch["text"]) * (s.n if s.kind in ("beam", "best_of_n") else 1)

  def __call__(self, params, batch, seed=0):
    """Decodes a batch {image float32[B,H,W,3], text, mask_ar, mask_input int32[B,T]}."""
    s = self.sampler
    # Only the loop's structure is static; temperature, top-k, top-p and eos are
    # arguments, so decoders that differ in them share one compiled program.
    mode = ("greedy" if s.kind == "greedy" else s.kind if s.kind in ("beam", "best_of_n")
            else "sample")
    settings = (jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p))
    eos = jnp.int32(-1 if self.eos_id is None else self.eos_id)
    layout = self.layout(params)
    head = self._output_head(params, self._rows(batch), layout)
    return _decode(self.model, self.max_decode_len, mode, s.n, self.pad_id, layout,
                   params, head, batch["image"], batch["text"], batch["mask_ar"],
                   batch["mask_input"], jax.random.PRNGKey(seed), settings, eos)

  def prefill(self, params, batch):
    """(logits float32[B, V] of the first new token, the `Cache`): the first step of
    `__call__` alone, as it runs there (benchmarks time it)."""
    layout = self.layout(params)
    head = self._output_head(params, self._rows(batch), layout)
    return _prefill_jit(self.model, self.max_decode_len, layout, params, head, batch["image"],
                        batch["text"], batch["mask_ar"], batch["mask_input"])

  def _output_head(self, params, rows, layout):
    """float[D, V], the embedding transposed, for decoding `rows` rows unsharded on a CPU
    from _HEAD_MIN_ROWS up; None otherwise (the output layer reads the embedding).

    XLA's CPU dot of a batch of rows with a [D, V] matrix is faster than with the [V, D]
    embedding (measured: 12 vs 17 ms a step at batch 16, vocabulary 257k, width 256; no
    difference at batch 1), and the numbers are the same. The transpose is made once per
    embedding array this decoder is given (calls with the same params reuse it) and held
    until another comes: one more copy of the embedding in host memory.
    """
    if layout is not None or rows < _HEAD_MIN_ROWS or jax.default_backend() != "cpu":
      return None  # (Sharded: decoding lays the embedding out over the mesh instead.)
    emb = params["llm"]["embedder"]["input_embedding"]
    if isinstance(emb, jax.core.Tracer):
      return None  # Under a trace: nothing to keep; the caller's jit has the embedding.
    if isinstance(emb, jax.Array) and len(emb.sharding.device_set) > 1:
      return None
    if self._head is not None and self._head[0]() is emb:
      return self._head[1]
    # The old transpose goes first: two at a time would be two more copies.
    self._head = None
    head = _transpose(emb)
    try:
      self._head = (weakref.ref(emb), head)
    except TypeError:  # (Not weakly referenceable: used for this call only.)
      pass
    return head

  @staticmethod
  def texts(tokenizer, out):
    """list[str] of the generated text of each example, cut at the first eos."""
    return [tokenizer.decode(row) for row in jax.device_get(out["tokens"])]


# The output layer of decoding on a CPU, from batches of this many rows up, reads the
# embedding transposed (Decoder._output_head).
_HEAD_MIN_ROWS = 4

_transpose = jax.jit(jnp.transpose)


# -- inside jit ----------------------------------------------------------------------
# Static: model (hashable: its tower configs are resolved), steps (max_decode_len), mode
# ("greedy", "sample", "beam", "best_of_n"), n, pad_id, layout. Traced: everything else.
# jit keeps one compiled program per static arguments and input shapes.


def _logits(model, params, head, x):
  """float32[B, V] from the LLM's features float[B, D]: the tied output layer, through
  `head` float[D, V] (the embedding transposed) where the decoder made one; trainable
  token rows (LoRA, unmerged) set their columns either way."""
  cap = model.llm.final_logits_softcap
  if head is None:
    z = gemma.tied_logits(x, params["llm"]["embedder"]["input_embedding"], model.dtype, cap)
  else:
    z = layers.softcap(jnp.einsum("...D,DV->...V", x.astype(model.dtype),
                                  head.astype(model.dtype), preferred_element_type=jnp.float32),
                       cap)
  return gemma.with_token_rows(z, x, gemma.token_rows(params, model.lora), model.dtype, cap)


def _prefill(model, steps, layout, params, head, image, text, mask_ar, mask_input):
  """(logits float32[B, V], Cache) of image + prompt, in a cache with room for `steps`."""
  if layout is not None:
    image, text, mask_ar, mask_input = layout.batch((image, text, mask_ar, mask_input))
  cache_size = model.num_image_tokens + text.shape[1] + steps
  x, cache = model.apply({"params": params}, image, text, mask_ar, mask_input, cache_size,
                         method=Model.prefill)
  return _logits(model, params, head, x), cache


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _decode(model, steps, mode, n, pad_id, layout, params, head, image, text, mask_ar,
            mask_input, rng, settings, eos):
  """Prefill, then the decode loop; see `Decoder` for the inputs and outputs (head:
  Decoder._output_head's or None)."""
  constrain = _unconstrained if layout is None else (
      lambda cache: cache.constrain(layout.mesh, layout.batch_axes, layout.model_axis))
  logits, cache = _prefill(model, steps, layout, params, head, image, text, mask_ar,
                           mask_input)
  cache = constrain(cache)

  # Every step's cache keeps the prefill's layout (a stable while_loop carry).
  def extend(tokens, cache):
    x, cache = model.apply({"params": params}, tokens, cache, method=Model.extend)
    return _logits(model, params, head, x), cache

  loop = dict(extend=extend, steps=steps, pad_id=pad_id, eos=eos, constrain=constrain)
  if mode == "beam":
    return _beam(logits, cache, n, **loop)
  if mode == "best_of_n":
    b = logits.shape[0]
    logits = jnp.repeat(logits, n, axis=0)
    cache = constrain(cache.repeat(n))
    out = _sample(logits, cache, rng, settings, **loop)
    best = jnp.argmax(out["scores"].reshape(b, n), axis=-1)
    rows = jnp.arange(b) * n + best
    return {k: v[rows] for k, v in out.items()}
  return _sample(logits, cache, rng, settings if mode == "sample" else None, **loop)


def _sample(logits, cache, rng, settings, *, extend, steps, pad_id, eos, constrain):
  """Greedy / sampling loop: one token per example per step, until all ended."""
  b = logits.shape[0]

  def pick(i, logits, done):
    token = jnp.where(done, pad_id, choose(jax.random.fold_in(rng, i), logits, settings))
    logp = token_logprob(logits, jnp.where(done, 0, token))  # (pad_id may be out of range.)
    return token, jnp.where(done, 0.0, logp)

  def write(state, i, token, logp):
    tokens, logprobs, done = state
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    logprobs = jax.lax.dynamic_update_slice(logprobs, logp[:, None], (0, i))
    return tokens, logprobs, done | (token == eos)

  state = (jnp.full((b, steps), pad_id, jnp.int32), jnp.zeros((b, steps), jnp.float32),
           jnp.zeros((b,), bool))
  token, logp = pick(0, logits, state[2])
  state = write(state, 0, token, logp)

  def cond(carry):
    i, _, _, (_, _, done) = carry
    return (i < steps) & ~jnp.all(done)

  def body(carry):
    i, last, cache, state = carry
    logits, cache = extend(last, cache)
    token, logp = pick(i, logits, state[2])
    return i + 1, token, constrain(cache), write(state, i, token, logp)

  _, _, _, (tokens, logprobs, _) = jax.lax.while_loop(
      cond, body, (jnp.asarray(1, jnp.int32), token, cache, state))
  return _outputs(tokens, logprobs, eos)


def _beam(logits, cache, k, *, extend, steps, pad_id, eos, constrain):
  """Beam search over total log-probability; a finished beam keeps its score."""
  b, v = logits.shape[0], logits.shape[-1]
  cache = constrain(cache.repeat(k))
  logits = jnp.repeat(logits, k, axis=0)
  # Only beam 0 is live at first, so the k beams do not start as k copies.
  scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(b, 0)
  tokens = jnp.full((b, k, steps), pad_id, jnp.int32)
  logprobs = jnp.zeros((b, k, steps), jnp.float32)
  done = jnp.zeros((b, k), bool)
  # A finished beam has one continuation, pad at no cost, so it competes unchanged.
  finished_row = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)

  def step(i, logits, cache, scores, tokens, logprobs, done):
    logp = jax.nn.log_softmax(logits).reshape(b, k, v)
    logp = jnp.where(done[..., None], finished_row, logp)
    top, idx = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * v), k)
    parent, token = idx // v, (idx % v).astype(jnp.int32)
    chosen = jnp.take_along_axis(logp.reshape(b, k * v), idx, axis=1)
    gather = lambda x: jnp.take_along_axis(
        x, parent.reshape(parent.shape + (1,) * (x.ndim - 2)), axis=1)
    tokens, logprobs, done = gather(tokens), gather(logprobs), gather(done)
    tokens = jax.lax.dynamic_update_slice(tokens, token[..., None], (0, 0, i))
    logprobs = jax.lax.dynamic_update_slice(logprobs, chosen[..., None], (0, 0, i))
    done = done | (token == eos)
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
    return token.reshape(-1), constrain(cache.take(rows)), top, tokens, logprobs, done

  carry = step(0, logits, cache, scores, tokens, logprobs, done)

  def cond(carry):
    i, *_, done = carry
    # Scores only fall as beams grow, so a finished best beam (top_k sorts) stays best.
    return (i < steps) & ~jnp.all(done[:, 0])

  def body(carry):
    i, last, cache, scores, tokens, logprobs, done = carry
    logits, cache = extend(last, cache)
    return (i + 1,) + step(i, logits, cache, scores, tokens, logprobs, done)

  _, _, _, _, tokens, logprobs, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(1, jnp.int32),) + carry)
  return _outputs(tokens[:, 0], logprobs[:, 0], eos)


def _outputs(tokens, logprobs, eos):
  is_eos = tokens == eos
  after = (jnp.cumsum(is_eos, axis=-1) - is_eos) > 0  # Strictly after the first eos.
  return {"tokens": tokens, "logprobs": logprobs, "scores": jnp.sum(logprobs, axis=-1),
          "lengths": jnp.sum(~after, axis=-1).astype(jnp.int32)}


def decode(model, params, batch, *, max_decode_len, sampler="greedy", seed=0,
           eos_id=tokenizer_lib.EOS_ID, mesh=None):
  """Decodes a batch (see `Decoder`); compiled programs are shared, one per shape."""
  decoder = Decoder(model, max_decode_len=max_decode_len, sampler=sampler, eos_id=eos_id,
                    mesh=mesh)
  return decoder(params, batch, seed)

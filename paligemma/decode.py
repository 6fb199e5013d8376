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
tied output layer to them (`gemma.tied_logits`). Greedy decoding of more than one row,
unsharded on a CPU, makes the logits vocabulary-first, float32[V, B], and picks down that
axis (`pick_vocab_first`): there XLA's matmul and reductions are faster that way round
(measured at batch 16, vocabulary 257k, width 256: 24 against 35 ms for output layer
and pick), and the tokens are the same.

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

import jax
import jax.numpy as jnp

from paligemma import sharding
from paligemma import tokenizer as tokenizer_lib
from paligemma.models import gemma
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

  top-k keeps the logits >= the k-th largest (ties included); the nucleus keeps a token
  while the probability of the tokens before it in descending order is < p (the
  smallest set reaching p), ties included. temperature > 0, top_k (0: off) and top_p
  (1: off) may be traced scalars, so one compiled program serves every setting.

  Without sorting: each threshold is found by bisection over the 2^32 float32 values,
  32 passes of counts (top-k) or masked sums (nucleus) over the logits, run only when
  its filter is on (measured at batch 16, vocabulary 257k: 94 ms for both, against
  930 ms for one sort of the rows).
  """
  logits = logits / temperature
  b, v = logits.shape
  top_k = jnp.minimum(top_k, v)
  key = _order_key(logits)
  below = jnp.min(key, axis=-1) - 1  # Below every logit: each test fails there.
  top = jnp.max(key, axis=-1)

  def kth():  # The k-th largest: one below the smallest t with fewer than k logits >= t.
    return _from_key(_bisect(below, top + 1,
                             lambda t: jnp.sum(key >= t[:, None], axis=-1) < top_k) - 1)

  def cutoff():  # The smallest t with mass(logits > t) < p: the last token kept.
    probs = jax.nn.softmax(logits, axis=-1)
    return _from_key(_bisect(below, top, lambda t: jnp.sum(
        jnp.where(key > t[:, None], probs, 0.0), axis=-1) < top_p))

  off = lambda: jnp.full((b,), -jnp.inf, logits.dtype)
  least = jnp.maximum(jax.lax.cond(top_k > 0, kth, off), jax.lax.cond(top_p < 1, cutoff, off))
  return jnp.where(logits >= least[:, None], logits, -jnp.inf)


def _order_key(x):
  """uint32 keys of float32 x in the same order (-inf first, +inf last)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_key(key):
  """The float32 whose `_order_key` is `key`."""
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bisect(low, high, test):
  """uint32[B]: the smallest t in (low, high] with test(t) true, per row, for a test
  false at `low`, true at `high` and monotone in between (32 steps: any uint32 range)."""
  def step(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    ok = test(mid)
    return jnp.where(ok, low, mid), jnp.where(ok, mid, high)
  return jax.lax.fori_loop(0, 32, step, (low, high))[1]


def argmax(logits, axis=-1):
  """int32[B]: jnp.argmax(logits, axis), the first of tied maxima, of float32[B, V]
  (axis -1) or float32[V, B] (axis 0).

  Blocked: the max of each block of a few logits, the first block that holds the
  largest, then the first index in that block. Inside the decode loop on XLA's CPU
  backend this is faster than one (value, index) reduction over the whole vocabulary
  (measured at batch 16, vocabulary 257k: 10-14% off a greedy step on [B, V] logits;
  on [V, B] logits 2.2 against 9 ms).
  """
  vocab = axis % 2
  v = logits.shape[vocab]
  size = next((c for c in (32, 16, 8) if v % c == 0), None)
  if size is None:
    return jnp.argmax(logits, axis=axis).astype(jnp.int32)
  blocks = logits.reshape(logits.shape[:vocab] + (v // size, size) + logits.shape[vocab + 1:])
  block = jnp.argmax(jnp.max(blocks, axis=vocab + 1), axis=vocab)
  first = jnp.take_along_axis(blocks, jnp.expand_dims(block, (vocab, vocab + 1)), axis=vocab)
  return (block * size + jnp.argmax(first.squeeze(vocab), axis=vocab)).astype(jnp.int32)


def token_logprob(logits, token):
  """float32[B]: log_softmax(logits)[b, token[b]], without the [B, V] log-softmax."""
  chosen = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return chosen - jax.nn.logsumexp(logits, axis=-1)


def pick_vocab_first(logits):
  """(int32[B] tokens, float32[B] log-probabilities): `argmax` and `token_logprob` of
  the transposed logits float32[V, B], each a reduction down the vocabulary axis."""
  top = jnp.max(logits, axis=0)
  return argmax(logits, axis=0), -jnp.log(jnp.sum(jnp.exp(logits - top), axis=0))


# Candidates `sample_filtered` draws among when top-k / nucleus keep no more than these.
_CANDIDATES = 1024


def choose(rng, logits, settings):
  """int32[B] next tokens from float32[B, V] logits; settings None is greedy, else
  (temperature, top_k, top_p), where temperature 0 is greedy too."""
  greedy = argmax(logits)
  if settings is None:
    return greedy
  t, k, p = settings
  keys = jax.random.split(rng, logits.shape[0])  # One key per row.
  scaled = logits / jnp.where(t > 0, t, 1.0)
  # Only the branch these settings need runs: greedy, filtered, or the whole softmax.
  branch = jnp.where(t <= 0, 0, jnp.where((k > 0) | (p < 1), 1, 2))
  return jax.lax.switch(branch, [
      lambda: greedy, lambda: sample_filtered(keys, scaled, k, p),
      lambda: sample_softmax(keys, scaled)])


def sample_softmax(keys, logits):
  """int32[B]: one token per row drawn from softmax(logits) float32[B, V] (one key per
  row; -inf: never drawn), by inverting the cumulative probabilities with one uniform
  number per row: the block holding it, then the token in the block. (Gumbel noise,
  jax.random.categorical, draws V numbers a row: 80 against 5 ms at batch 16,
  vocabulary 257k.)"""
  b, v = logits.shape
  size = 64
  pad = -v % size
  mass = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  blocks = jnp.pad(mass, ((0, 0), (0, pad))).reshape(b, (v + pad) // size, size)
  block_mass = jnp.sum(blocks, axis=-1)  # [B, blocks]
  ends = jnp.cumsum(block_mass, axis=-1)
  u = jax.vmap(jax.random.uniform)(keys) * ends[:, -1]
  # The first block ending past u; rounding may leave none: then the last with mass.
  block = jnp.minimum(jnp.sum(ends <= u[:, None], axis=-1), _last_true(block_mass > 0))
  inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, size]
  start = jnp.take_along_axis(ends - block_mass, block[:, None], axis=1)
  past = (start + jnp.cumsum(inside, axis=-1) > u[:, None]) & (inside > 0)
  offset = jnp.where(jnp.any(past, axis=-1), jnp.argmax(past, axis=-1), _last_true(inside > 0))
  return (block * size + offset).astype(jnp.int32)


def _last_true(x):
  """int32[B]: the index of the last True of each row of bool[B, N] (N - 1 if none)."""
  return (x.shape[-1] - 1 - jnp.argmax(x[:, ::-1], axis=-1)).astype(jnp.int32)


def sample_filtered(keys, logits, top_k, top_p, candidates=_CANDIDATES):
  """int32[B] tokens drawn from softmax(logits) over the tokens `filter_logits(logits,
  1, top_k, top_p)` keeps (one key per row).

  When every row's kept tokens are among its `candidates` largest logits (`lax.top_k`),
  it draws among those; otherwise it filters the whole vocabulary (`filter_logits`)
  (measured at batch 16, vocabulary 257k, top-k 40: 20 ms, against 110 ms for
  filter_logits and 970 ms with a sort).
  """
  v = logits.shape[-1]
  c = min(candidates, v)
  # (The barrier keeps XLA from folding the slices below into a full sort of the row.)
  top, index = jax.lax.optimization_barrier(jax.lax.top_k(logits, c))
  probs = jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  before = jnp.cumsum(probs, axis=-1) - probs
  kth = jnp.take(top, jnp.clip(top_k, 1, c) - 1, axis=1)
  cutoff = jnp.min(jnp.where(before < top_p, top, jnp.inf), axis=-1)
  keep = (((top_k <= 0) | (top >= kth[:, None])) &
          ((top_p >= 1) | (top >= cutoff[:, None])))
  # Rows whose kept set ends strictly above their c-th logit: nothing kept lies beyond.
  last = top[:, -1]
  fits = (c == v) | ((top_k > 0) & (top_k <= c) & (kth > last)) | (
      (top_p < 1) & (before[:, -1] >= top_p) & (cutoff > last))

  def among_candidates():
    pick = sample_softmax(keys, jnp.where(keep, top, -jnp.inf))
    return jnp.take_along_axis(index, pick[:, None], axis=1)[:, 0]

  def whole_vocabulary():
    return sample_softmax(keys, filter_logits(logits, 1.0, top_k, top_p))

  return jax.lax.cond(jnp.all(fits), among_candidates, whole_vocabulary).astype(jnp.int32)


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

  def layout(self, params):
    """The `Layout` used for `params` (None: unsharded)."""
    mesh = self.mesh if self.mesh is not None else sharding.mesh_of(params)
    if mesh is None:
      return None
    return Layout(mesh, self.batch_axes, self.model_axis)

  def __call__(self, params, batch, seed=0):
    """Decodes a batch {image float32[B,H,W,3], text, mask_ar, mask_input int32[B,T]}."""
    s = self.sampler
    # Only the loop's structure is static; temperature, top-k, top-p and eos are
    # arguments, so decoders that differ in them share one compiled program.
    mode = ("greedy" if s.kind == "greedy" else s.kind if s.kind in ("beam", "best_of_n")
            else "sample")
    settings = (jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p))
    eos = jnp.int32(-1 if self.eos_id is None else self.eos_id)
    return _decode(self.model, self.max_decode_len, mode, s.n, self.pad_id,
                   self.layout(params), params, batch["image"], batch["text"],
                   batch["mask_ar"], batch["mask_input"], jax.random.PRNGKey(seed), settings,
                   eos)

  def prefill(self, params, batch):
    """(logits float32[B, V] of the first new token, the `Cache`): the image + prompt
    forward pass and the output layer, the first step of `__call__` (benchmarks; greedy
    decoding of several rows on a CPU makes the same logits vocabulary-first)."""
    return _prefill_logits(self.model, self.max_decode_len, self.layout(params), params,
                           batch["image"], batch["text"], batch["mask_ar"],
                           batch["mask_input"])

  @staticmethod
  def texts(tokenizer, out):
    """list[str] of the generated text of each example, cut at the first eos."""
    return [tokenizer.decode(row) for row in jax.device_get(out["tokens"])]


# -- inside jit ----------------------------------------------------------------------
# Static: model (hashable: its tower configs are resolved), steps (max_decode_len), mode
# ("greedy", "sample", "beam", "best_of_n"), n, pad_id, layout. Traced: everything else.
# jit keeps one compiled program per static arguments and input shapes.


def _logits(model, params, x, vocab_first=False):
  """float32[B, V] (vocab_first: [V, B]) from the LLM's features float[B, D]: the tied
  output layer, with the columns of trainable token rows (LoRA, unmerged)."""
  return gemma.output_logits(x, params["llm"]["embedder"]["input_embedding"],
                             gemma.token_rows(params, model.lora), model.dtype,
                             model.llm.final_logits_softcap, vocab_first)


def _prefill(model, steps, layout, params, image, text, mask_ar, mask_input):
  """(features float[B, D] of the last prompt token, Cache) of image + prompt, in a cache
  with room for `steps`."""
  if layout is not None:
    image, text, mask_ar, mask_input = layout.batch((image, text, mask_ar, mask_input))
  cache_size = model.num_image_tokens + text.shape[1] + steps
  return model.apply({"params": params}, image, text, mask_ar, mask_input, cache_size,
                     method=Model.prefill)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill_logits(model, steps, layout, params, *batch):
  x, cache = _prefill(model, steps, layout, params, *batch)
  return _logits(model, params, x), cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _decode(model, steps, mode, n, pad_id, layout, params, image, text, mask_ar,
            mask_input, rng, settings, eos):
  """Prefill, then the decode loop; see `Decoder` for the inputs and outputs."""
  constrain = _unconstrained if layout is None else (
      lambda cache: cache.constrain(layout.mesh, layout.batch_axes, layout.model_axis))
  x, cache = _prefill(model, steps, layout, params, image, text, mask_ar, mask_input)
  cache = constrain(cache)
  logits = functools.partial(_logits, model, params)

  # Every step's cache keeps the prefill's layout (a stable while_loop carry).
  def extend(tokens, cache):
    return model.apply({"params": params}, tokens, cache, method=Model.extend)

  loop = dict(extend=extend, steps=steps, pad_id=pad_id, eos=eos, constrain=constrain)
  if mode == "beam":
    return _beam(logits, x, cache, n, **loop)

  def sample(key, x):
    z = logits(x)
    token = choose(key, z, settings)
    return token, token_logprob(z, token)

  if mode == "best_of_n":
    b = x.shape[0]
    x, cache = jnp.repeat(x, n, axis=0), constrain(cache.repeat(n))
    out = _sample(sample, x, cache, rng, **loop)
    best = jnp.argmax(out["scores"].reshape(b, n), axis=-1)
    rows = jnp.arange(b) * n + best
    return {k: v[rows] for k, v in out.items()}
  if mode == "sample":
    return _sample(sample, x, cache, rng, **loop)

  return _sample(lambda _, x: _greedy(model, params, layout, x), x, cache, rng, **loop)


def vocab_first(rows, layout):
  """Whether greedy decoding of `rows` rows picks from vocabulary-first logits (see the
  module docstring): from 2 rows up, unsharded, on a CPU."""
  return rows > 1 and layout is None and jax.default_backend() == "cpu"


def _greedy(model, params, layout, x):
  """(int32[B] tokens, float32[B] log-probabilities): the greedy pick from features x
  float[B, D], through vocabulary-first logits where `vocab_first`."""
  if vocab_first(x.shape[0], layout):
    return pick_vocab_first(_logits(model, params, x, vocab_first=True))
  z = _logits(model, params, x)
  token = argmax(z)
  return token, token_logprob(z, token)


def _sample(choice, x, cache, rng, *, extend, steps, pad_id, eos, constrain):
  """Greedy / sampling loop: one token per example per step, until all ended.
  choice(key, features float[B, D]) -> (int32[B] tokens, float32[B] log-probabilities)."""
  b = x.shape[0]

  def pick(i, x, done):
    token, logp = choice(jax.random.fold_in(rng, i), x)
    return jnp.where(done, pad_id, token), jnp.where(done, 0.0, logp)

  def write(state, i, token, logp):
    tokens, logprobs, done = state
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
    logprobs = jax.lax.dynamic_update_slice(logprobs, logp[:, None], (0, i))
    return tokens, logprobs, done | (token == eos)

  state = (jnp.full((b, steps), pad_id, jnp.int32), jnp.zeros((b, steps), jnp.float32),
           jnp.zeros((b,), bool))
  token, logp = pick(0, x, state[2])
  state = write(state, 0, token, logp)

  def cond(carry):
    i, _, _, (_, _, done) = carry
    return (i < steps) & ~jnp.all(done)

  def body(carry):
    i, last, cache, state = carry
    x, cache = extend(last, cache)
    token, logp = pick(i, x, state[2])
    return i + 1, token, constrain(cache), write(state, i, token, logp)

  _, _, _, (tokens, logprobs, _) = jax.lax.while_loop(
      cond, body, (jnp.asarray(1, jnp.int32), token, cache, state))
  return _outputs(tokens, logprobs, eos)


def beam_choices(logits, scores, done, pad_id):
  """One beam-search step: of every beam's continuations, the k best by total score.

  logits float32[B*k, V] (row b*k + j: beam j of example b), scores float32[B, k],
  done bool[B, k] (a finished beam has one continuation, pad_id at no cost, so it
  competes unchanged). Returns new scores float32[B, k] (descending), parent int32[B, k]
  (the beam each continues), token int32[B, k], and its log-probability float32[B, k].

  The k best of all are among each beam's own k best: the top k of each row, then of
  those k * k, with ties to the lower beam, then the lower token, as one top_k over all
  k * V would give them, and without a [B*k, V] log-softmax.
  """
  b, k = scores.shape
  best, best_token = jax.lax.optimization_barrier(jax.lax.top_k(logits, k))
  logp = (best - jax.nn.logsumexp(logits, axis=-1, keepdims=True)).reshape(b, k, k)
  logp = jnp.where(done[..., None], jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), logp)
  best_token = jnp.where(done[..., None], pad_id, best_token.reshape(b, k, k))
  top, idx = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * k), k)
  token = jnp.take_along_axis(best_token.reshape(b, k * k), idx, axis=1).astype(jnp.int32)
  return top, idx // k, token, jnp.take_along_axis(logp.reshape(b, k * k), idx, axis=1)


def _beam(output_layer, x, cache, k, *, extend, steps, pad_id, eos, constrain):
  """Beam search over total log-probability; a finished beam keeps its score.
  output_layer: features float[B, D] -> logits float32[B, V]."""
  logits = output_layer(x)
  b = logits.shape[0]
  cache = constrain(cache.repeat(k))
  logits = jnp.repeat(logits, k, axis=0)
  # Only beam 0 is live at first, so the k beams do not start as k copies.
  scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None].repeat(b, 0)
  tokens = jnp.full((b, k, steps), pad_id, jnp.int32)
  logprobs = jnp.zeros((b, k, steps), jnp.float32)
  done = jnp.zeros((b, k), bool)

  def step(i, logits, cache, scores, tokens, logprobs, done):
    top, parent, token, chosen = beam_choices(logits, scores, done, pad_id)
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
    x, cache = extend(last, cache)
    logits = output_layer(x)
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

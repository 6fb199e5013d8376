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
unsharded on a CPU, makes the logits vocabulary-first, float32[V, B], and picks down
that axis (`sampling.pick_vocab_first`): there XLA's matmul and reductions are faster
that way round (measured at batch 16, vocabulary 257k, width 256: 24 against 35 ms for
output layer and pick), and the tokens are the same.

Prompts are right-padded (`paligemma.prompt.assemble(..., mode="eval")`); every example
keeps its own RoPE positions and attends only its real tokens, so an example decodes to
the same tokens whatever else is in the batch.

Samplers: "greedy", "temperature(t)", "topk(k, t)", "nucleus(p, t)", "beam(n)",
"best_of_n(n, t, k, p)"; paligemma/sampling.py reads the spec strings and draws.

Outputs (numpy-convertible jax arrays):
  tokens    int32[B, L]    generated tokens, eos included, pad (0) after it
  logprobs  float32[B, L]  the model's log-probability of each token (temperature 1,
                           no filtering), 0 after eos
  scores    float32[B]     sum of logprobs
  lengths   int32[B]       number of generated tokens, eos included
Sampling is reproducible for a given (seed, batch); unlike greedy and beam search, a
sample depends on the example's row in the batch (each row draws its own key).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from paligemma import sampling
from paligemma import sharding
from paligemma import tokenizer as tokenizer_lib
from paligemma.checkpoint import tree
from paligemma.models import gemma
from paligemma.models.paligemma import Model

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
    self.sampler = sampling.parse_sampler(sampler)
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
    _check_layers(self.model, params)
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
    _check_layers(self.model, params)
    return _prefill_logits(self.model, self.max_decode_len, self.layout(params), params,
                           batch["image"], batch["text"], batch["mask_ar"],
                           batch["mask_input"])

  @staticmethod
  def texts(tokenizer, out):
    """list[str] of the generated text of each example, cut at the first eos."""
    return [tokenizer.decode(row) for row in jax.device_get(out["tokens"])]


def _check_layers(model, params):
  """A ValueError unless params and model keep the layers alike (stacked: Model.scan)."""
  stacked = tree.is_stacked(params)
  if stacked != model.scan:
    raise ValueError(
        f"The params keep the layers {'stacked' if stacked else 'apart (layers_i)'} but the "
        f"model was built with scan={model.scan}: build it with scan={stacked} "
        f"(build.build_model(config, scan={stacked})) or load the params with "
        f"checkpoint.load(..., stacked={model.scan}).")


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

  def draw(key, z):
    token = sampling.choose(key, z, settings)
    return token, sampling.token_logprob(z, token)

  sample = lambda key, x: draw(key, logits(x))
  if mode == "best_of_n":
    b = x.shape[0]
    # The prompt's logits once, repeated: the n samples of an example start alike.
    z = jnp.repeat(logits(x), n, axis=0)
    out = _sample(sample, lambda key: draw(key, z), constrain(cache.repeat(n)), rng, **loop)
    best = jnp.argmax(out["scores"].reshape(b, n), axis=-1)
    rows = jnp.arange(b) * n + best
    return {k: v[rows] for k, v in out.items()}
  if mode == "sample":
    return _sample(sample, lambda key: sample(key, x), cache, rng, **loop)
  greedy = lambda _, x: _greedy(model, params, layout, x)
  return _sample(greedy, lambda key: greedy(key, x), cache, rng, **loop)


def stacked_layers():
  """Whether inference keeps each tower's layers stacked (`Model.scan`, the default of
  `checkpoint.load(stacked=)`): on accelerators. On a CPU it keeps them apart: XLA's CPU
  backend copies a layer's weights out of the stack (a scan's dynamic slice) before
  every matmul, each decode step, where separate weights are read in place. At Gemma
  2B's widths that copy made a layer's step 55 against 20 ms at batch 1."""
  return jax.default_backend() != "cpu"


def vocab_first(rows, layout):
  """Whether greedy decoding of `rows` rows picks from vocabulary-first logits (see the
  module docstring): from 2 rows up, unsharded, on a CPU."""
  return rows > 1 and layout is None and jax.default_backend() == "cpu"


def _greedy(model, params, layout, x):
  """(int32[B] tokens, float32[B] log-probabilities): the greedy pick from features x
  float[B, D], through vocabulary-first logits where `vocab_first`."""
  if vocab_first(x.shape[0], layout):
    return sampling.pick_vocab_first(_logits(model, params, x, vocab_first=True))
  z = _logits(model, params, x)
  token = sampling.argmax(z)
  return token, sampling.token_logprob(z, token)


def _sample(choice, first, cache, rng, *, extend, steps, pad_id, eos, constrain):
  """Greedy / sampling loop: one token per example per step, until all ended.
  choice(key, features float[B, D]) -> (int32[B] tokens, float32[B] log-probabilities);
  first(key): the same for the first token, from the prompt."""
  token, logp = first(jax.random.fold_in(rng, 0))
  b = token.shape[0]

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
    top, parent, token, chosen = sampling.beam_choices(logits, scores, done, pad_id)
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

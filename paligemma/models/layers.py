"""Shared by both towers: attention, soft-capping, layer stacking (scan), remat, and
the weight casts of mixed-precision matmuls."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma import lora as lora_lib
from paligemma import quant

_MASKED = -2.3819763e38  # Large negative logit for masked keys (finite: no NaN if all masked).

REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")


class Layer(nn.Module):
  """A module computing in `dtype` and storing its parameters in `param_dtype`, with
  LoRA adapters on the weights `lora` targets (keyword-only, so subclasses list their
  own fields first)."""
  _: dataclasses.KW_ONLY
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: lora_lib.LoraConfig | None = None

  def weight(self, name, init, shape):
    """self.param(name, init, shape, param_dtype), except that a weight stored quantized
    (quant.QArray, QLoRA's frozen base) is returned as it is: flax would compare its
    codes' shape with `shape`."""
    if self.has_variable("params", name):
      value = self.get_variable("params", name)
      if isinstance(value, quant.QArray):
        if value.shape != tuple(shape):
          raise ValueError(f"Quantized weight {'/'.join(self.path + (name,))} has shape "
                           f"{value.shape}, the model expects {tuple(shape)}")
        return value
    return self.param(name, init, shape, self.param_dtype)

  def adapter(self, name, shape, eqn, x):
    """(alpha / rank) * B A x for this module's weight `name` of per-layer `shape`, used
    as einsum(eqn, x, weight); None when config.lora does not target it.

    The adapter leaves `<name>_lora_a` / `_lora_b` are created here, in param_dtype.
    With lora.dropout, x is dropped out when the caller passes a "dropout" rng (the
    train step does; evaluation and decoding do not).
    """
    if self.lora is None:
      return None
    full = "/".join(self.path + (name,))
    if not self.lora.targets_weight(full):
      return None
    lay = lora_lib.layout(full)
    a_shape, b_shape = lay.shapes(shape, self.lora.rank)
    size = dict(zip(lay.weight, shape))
    fan_in = math.prod(size[c] for c in lay.inputs)
    a = self.param(name + "_lora_a", lora_lib.init_a(fan_in), a_shape, self.param_dtype)
    b = self.param(name + "_lora_b", nn.initializers.zeros, b_shape, self.param_dtype)
    if self.lora.dropout and self.has_rng("dropout"):
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora.dropout), 0).astype(x.dtype)
    dtype = jnp.dtype(self.dtype)
    delta = lora_delta(lora_lib.delta_specs(eqn, lay), x.astype(dtype), a.astype(dtype),
                       b.astype(dtype))
    return delta * jnp.asarray(self.lora.scale, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lora_delta(s, x, a, b):
  """B A x for the operands `s` (lora.DeltaSpecs): einsum("U,B->y", einsum("x,A->U")).

  Its own gradient only orders the backward einsums: each contracts the token axes with
  the small gradient of A x as its first operand, so that XLA's CPU backend transposes
  that [tokens, r] array rather than the activations (a copy of the MLP's hidden
  activations per layer took about 8 ms of a 100 ms step on 2 cores)."""
  return _lora_delta_fwd(s, x, a, b)[0]


def _lora_delta_fwd(s, x, a, b):
  u = jnp.einsum(f"{s.x},{s.a}->{s.u}", x, a)
  return jnp.einsum(f"{s.u},{s.b}->{s.y}", u, b), (x, a, b, u)


def _lora_delta_bwd(s, res, g):
  x, a, b, u = res
  du = jnp.einsum(f"{s.y},{s.b}->{s.u}", g, b)
  db = jnp.einsum(f"{s.u},{s.y}->{s.b}", u, g)
  dx = jnp.einsum(f"{s.u},{s.a}->{s.x}", du, a)
  da = jnp.einsum(f"{s.u},{s.x}->{s.a}", du, x)
  return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def add_adapter(y, delta):
  """y + delta, or y when there is no adapter (delta None)."""
  return y if delta is None else y + delta.astype(y.dtype)


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


def cast_einsum(eqn, x, w, dtype):
  """jnp.einsum(eqn, x, w) computed in `dtype` (x and w cast to it first); w may be a
  quant.QArray (QLoRA's frozen base), dequantized to `dtype`.

  When the weight is stored in another dtype (frozen weights kept in float16 under
  float32 compute, float32 master weights under bfloat16 compute, 4-bit codes), the cast
  runs inside a jax.checkpoint whose only residuals are x and the stored w: the backward
  pass casts the weight again (quant.einsum). Without it, autodiff keeps each layer's
  cast copy for the backward pass, and a scan over layers stacks them into a second,
  wider copy of every weight (4 GiB of float32 copies of the float16 frozen MLPs of
  PaliGemma 2 3B at batch 10).

  A weight whose leading axes x lacks is contracted as a batch of matrices over them
  where that reads it in place and is faster (see FEW_ROWS).
  """
  lhs, rest = eqn.split(",")
  rhs, out = rest.split("->")
  lead = _lead_axes(lhs, rhs)
  if lead and (out.startswith(lead) or _few_rows(x, lhs, rhs)):
    return _batched_einsum(lead, lhs, rhs, out, x, w, dtype)
  return quant.einsum(eqn, x, w, dtype)


# With at most this many rows (decoding up to 16 sequences), every weight whose leading
# axes x does not have (q_einsum [N, D, H], kv_einsum [2, K, D, H]) is contracted as a
# batch of matrices over them, read in place. The plain einsum has XLA lay such a weight
# out again (on a CPU a copy every call, [N, D, H] to [D, N, H]), which for a few rows
# costs more than the matmul; for many rows one large matmul after that copy beats a
# batch of small ones. Where those axes lead the output too (gating_einsum [2, D, F] ->
# [2, ..., F]), the batch of matrices is the better form for any number of rows: slicing
# the weight's halves copies them (on a CPU at one row, 70-78 ms for Gemma 2B's two
# halves and their matmuls, against 9 ms as a batch).
FEW_ROWS = 16


def _few_rows(x, lhs, rhs):
  """Whether x of einsum(f"{lhs},{rhs}->...", x, w) has at most FEW_ROWS rows (the
  product of the axes it does not contract with w)."""
  letters = list(lhs)
  if "..." in lhs:
    pre, post = lhs.split("...")
    letters = list(pre) + ["."] * (x.ndim - len(pre) - len(post)) + list(post)
  return math.prod(n for n, c in zip(x.shape, letters) if c not in rhs) <= FEW_ROWS


def _lead_axes(lhs, rhs):
  """The weight's leading axes that x does not have (a batch of matrices), or ""."""
  lead = ""
  for c in rhs:
    if c in lhs:
      break
    lead += c
  return lead if len(lead) < len(rhs) else ""


@functools.partial(jax.checkpoint, static_argnums=(0, 1, 2, 3, 6))
def _batched_einsum(lead, lhs, rhs, out, x, w, dtype):
  """einsum(lhs,rhs->out) as a batch of matrices over the weight's `lead` axes, x
  repeated over them (the checkpoint keeps x, not its copies, for the backward pass)."""
  batched = lead + "".join(c for c in out if c not in lead)
  xb = jnp.broadcast_to(x, w.shape[:len(lead)] + x.shape)
  y = quant.einsum(f"{lead}{lhs},{rhs}->{batched}", xb, w, dtype)
  return y if batched == out else jnp.einsum(f"{batched}->{out}", y)


_SQRT_2_OVER_PI = 0.7978845608028654


@jax.custom_vjp
def gelu_tanh(x):
  """gelu, tanh approximation: x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).

  The same values as jax.nn.gelu(approximate=True); its own gradient keeps only x and
  the tanh for the backward pass (autodiff of the formula keeps several intermediates
  of every MLP hidden unit, and recomputes the rest in a slower fusion on CPU).
  """
  return _gelu_tanh_fwd(x)[0]


def _gelu_tanh_fwd(x):
  c = jnp.asarray(_SQRT_2_OVER_PI, x.dtype)
  t = jnp.tanh(c * (x + 0.044715 * (x ** 3)))
  return x * (0.5 * (1.0 + t)), (x, t)


def _gelu_tanh_bwd(res, g):
  x, t = res
  c = jnp.asarray(_SQRT_2_OVER_PI, x.dtype)
  inner = c * (1.0 + 3 * 0.044715 * jnp.square(x))  # d/dx of tanh's argument.
  return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - jnp.square(t)) * inner),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def softcap(x, cap):
  """cap * tanh(x / cap); identity when cap is None or 0."""
  return x if not cap else jnp.tanh(x / cap) * cap


def fused_attention_available():
  """Whether jax.nn.dot_product_attention may pick a fused kernel (not on CPU)."""
  return jax.default_backend() != "cpu"


def attend(q, k, v, mask, logits_softcap=None):
  """Softmax attention, logits in float32. q float[B, T, N, H] (already scaled);
  k, v float[B, S, K, H]; mask bool[B, T, S] -> float[B, T, N, H].

  On accelerators, without a soft-cap, this is `jax.nn.dot_product_attention`, which
  picks the platform's fastest kernel (cuDNN's fused attention on GPU); the soft-cap sits
  between the logits and the softmax, which no fused kernel offers. On CPU both lower to
  the same XLA dots, and the einsums below also accept float16 there.
  """
  if not logits_softcap and fused_attention_available():
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0)
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  logits = softcap(logits, logits_softcap)
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)

"""SigLIP ViT image tower (big_vision parameter names), with PaliGemma's projector `head`.

Axis letters: B batch, N image tokens (patches), D width, H heads, K head dim, M mlp dim.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from paligemma.models import layers
from paligemma.models import variants


class Dense(layers.Layer):
  """einsum(eqn, x, kernel) + bias, with flax Dense / DenseGeneral's names and init
  (lecun-normal over the flattened (inputs, outputs) kernel, zero bias): written as an
  einsum so that the kernel can carry a LoRA adapter and be stored quantized."""
  eqn: str  # "x,kernel->y", the kernel's input letters first.
  shape: tuple  # The kernel's shape.
  num_inputs: int = 1  # How many leading kernel axes are contracted.

  @nn.compact
  def __call__(self, x):
    fan_in, fan_out = (math.prod(self.shape[:self.num_inputs]),
                       math.prod(self.shape[self.num_inputs:]))

    def init(key, shape, dtype):
      return nn.initializers.lecun_normal()(key, (fan_in, fan_out), dtype).reshape(shape)

    kernel = self.weight("kernel", init, self.shape)
    bias = self.param("bias", nn.initializers.zeros, self.shape[self.num_inputs:],
                      self.param_dtype)
    y = layers.cast_einsum(self.eqn, x, kernel, self.dtype)
    y = layers.add_adapter(y, self.adapter("kernel", self.shape, self.eqn, x))
    return y + bias.astype(y.dtype)


class MlpBlock(layers.Layer):
  """Dense -> gelu (tanh) -> Dense."""
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    """float[B, N, D] -> float[B, N, D]."""
    d, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    h = Dense("BND,DM->BNM", (d, self.mlp_dim), name="Dense_0", **kw)(x)
    return Dense("BNM,MD->BND", (self.mlp_dim, d), name="Dense_1", **kw)(layers.gelu_tanh(h))


class Attention(layers.Layer):
  """Bidirectional multi-head attention with biases (flax MultiHeadDotProductAttention names)."""
  num_heads: int

  @nn.compact
  def __call__(self, x):
    """float[B, N, D] -> float[B, N, D]."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"ViT width {width} is not divisible by num_heads {self.num_heads}")
    h, k = self.num_heads, width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    proj = lambda name: Dense("BND,DHK->BNHK", (width, h, k), name=name, **kw)(x)
    q, k, v = proj("query"), proj("key"), proj("value")
    q = q * (width // self.num_heads) ** -0.5
    mask = jnp.ones((q.shape[0], q.shape[1], k.shape[1]), bool)  # Bidirectional.
    out = layers.attend(q, k, v, mask)
    return Dense("BNHK,HKD->BND", (h, width // h, width), num_inputs=2, name="out", **kw)(out)


class Encoder1DBlock(layers.Layer):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  ln_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, _=None):
    """float[B, N, D] -> float[B, N, D] (scan-compatible: returns (x, None))."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(epsilon=self.ln_eps, name="LayerNorm_0", **kw)(x)
    x = x + Attention(self.num_heads, name="MultiHeadDotProductAttention_0", lora=self.lora,
                      **kw)(y)
    y = nn.LayerNorm(epsilon=self.ln_eps, name="LayerNorm_1", **kw)(x)
    x = x + MlpBlock(self.mlp_dim, name="MlpBlock_0", lora=self.lora, **kw)(y)
    return x, None


class Encoder(layers.Layer):
  """A stack of blocks (stacked on axis 0 as `encoderblock`, or `encoderblock_{i}`)."""
  depth: int
  mlp_dim: int
  num_heads: int
  ln_eps: float = 1e-6
  scan: bool = True
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x):
    """float[B, N, D] -> float[B, N, D]."""
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, ln_eps=self.ln_eps,
              dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    block = layers.maybe_remat(Encoder1DBlock, self.remat_policy)
    if self.scan:
      x, _ = layers.scan_layers(block, self.depth)(name="encoderblock", **kw)(x, None)
    else:
      for i in range(self.depth):
        x, _ = block(name=f"encoderblock_{i}", **kw)(x)
    return nn.LayerNorm(epsilon=self.ln_eps, name="encoder_norm", dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)


class ViT(layers.Layer):
  """SigLIP image encoder: patches -> tokens, no pooling, then the linear projector `head`."""
  config: variants.ViTConfig
  num_classes: int | None = None  # Output width of `head` (the LLM width); None: no head.
  scan: bool = True
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, image):
    """float32[B, H, W, 3] in [-1, 1] -> (float[B, N, num_classes], aux dict)."""
    cfg = self.config
    _, h, w, c = image.shape
    if h != cfg.image_size or w != cfg.image_size or c != 3:
      raise ValueError(f"Image batch of shape {image.shape[1:]} does not match the model's "
                       f"({cfg.image_size}, {cfg.image_size}, 3): resize the images or set "
                       f"img.image_size")
    x = nn.Conv(cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                name="embedding")(image.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / cfg.width ** 0.5),
                     (1, x.shape[1], cfg.width), self.param_dtype)
    x = x + pos.astype(x.dtype)
    x = Encoder(cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.ln_eps, self.scan,
                self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
                lora=self.lora, name="Transformer")(x)
    aux = {"pre_logits": x}
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="head")(x)
    return x, aux


def check_image_size(image_size, patch_size):
  """Raises if the resolution is not a whole number of patches."""
  if image_size % patch_size:
    raise ValueError(f"img.image_size={image_size} is not a multiple of the patch size "
                     f"{patch_size}; use e.g. {image_size // patch_size * patch_size} or "
                     f"{(image_size // patch_size + 1) * patch_size}")

"""Named architecture presets for the two towers, and how a tower config is resolved.

A tower config is written as a plain dict (configs, checkpoints, model_config.json): an
optional `variant` name plus any field, where a given field overrides the variant's
value. It is resolved once into a frozen, hashable `ViTConfig` / `GemmaConfig`
(`from_dict`; `to_dict` gives the complete dict back), which the model holds: a model
is then hashable and can be a static jit argument. `resolve_*` returns the complete
dict, for code that reads configs as dicts.
"""

import dataclasses

VIT_VARIANTS = {
    # name: width, depth, mlp_dim, num_heads (big_vision's naming; patch from "/NN").
    "mu": dict(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}
VIT_DEFAULTS = dict(variant=None, patch_size=14, image_size=224, ln_eps=1e-6)

_GEMMA1 = dict(post_norms=False, attn_logits_softcap=None, final_logits_softcap=None,
               sliding_window=None)
_GEMMA2 = dict(post_norms=True, attn_logits_softcap=50.0, final_logits_softcap=30.0,
               sliding_window=4096)
GEMMA_VARIANTS = {
    "gemma_2b": dict(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1,
                     head_dim=256, **_GEMMA1),
    "gemma2_2b": dict(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4,
                      head_dim=256, **_GEMMA2),
    "gemma2_9b": dict(width=3584, depth=42, mlp_dim=14336, num_heads=16, num_kv_heads=8,
                      head_dim=256, **_GEMMA2),
    "gemma2_27b": dict(width=4608, depth=46, mlp_dim=36864, num_heads=32, num_kv_heads=16,
                       head_dim=128, query_pre_attn_scalar=4608 / 32, **_GEMMA2),
    # Small variants for tests and the CPU demo: same structure, tiny sizes.
    "gemma_tiny": dict(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1,
                       head_dim=16, **_GEMMA1),
    "gemma2_tiny": dict(width=64, depth=4, mlp_dim=128, num_heads=4, num_kv_heads=2,
                        head_dim=16, **_GEMMA2),
}
GEMMA_DEFAULTS = dict(
    variant=None, vocab_size=257_152, query_pre_attn_scalar=None,
    rope_max_wavelength=10_000, norm_eps=1e-6, max_len=8192,
    post_norms=False, attn_logits_softcap=None, final_logits_softcap=None,
    sliding_window=None)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """A resolved SigLIP ViT tower (every field set; see VIT_VARIANTS for the presets)."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  variant: str | None  # Informative only; the other fields define the tower.
  patch_size: int
  image_size: int
  ln_eps: float

  @classmethod
  def from_dict(cls, cfg):
    """ViTConfig from a config dict (variant name and overrides), or `cfg` if one already."""
    return cfg if isinstance(cfg, cls) else cls(**resolve_vit(cfg))

  def to_dict(self):
    """The complete config dict (as `resolve_vit` returns it)."""
    return dataclasses.asdict(self)

  @property
  def num_tokens(self):
    """Image tokens (patches) per image."""
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """A resolved Gemma decoder (every field set; see GEMMA_VARIANTS for the presets)."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  variant: str | None  # Informative only; the other fields define the decoder.
  vocab_size: int
  query_pre_attn_scalar: float  # Queries are scaled by its -1/2 power.
  rope_max_wavelength: int
  norm_eps: float
  max_len: int  # Image + text tokens the model accepts.
  post_norms: bool  # Gemma 2's post-attention and post-ffw norms.
  attn_logits_softcap: float | None
  final_logits_softcap: float | None  # None or 0: no soft-cap.
  sliding_window: int | None  # Window of the even layers; None: all layers global.

  @classmethod
  def from_dict(cls, cfg):
    """GemmaConfig from a config dict (variant name and overrides), or `cfg` if one already."""
    return cfg if isinstance(cfg, cls) else cls(**resolve_gemma(cfg))

  def to_dict(self):
    """The complete config dict (as `resolve_gemma` returns it)."""
    return dataclasses.asdict(self)


VIT_FIELDS = tuple(f.name for f in dataclasses.fields(ViTConfig))
GEMMA_FIELDS = tuple(f.name for f in dataclasses.fields(GemmaConfig))


def _resolve(kind, cfg, variants, defaults, fields, variant_name):
  cfg = cfg.to_dict() if isinstance(cfg, (ViTConfig, GemmaConfig)) else dict(cfg or {})
  unknown = sorted(set(cfg) - set(fields))
  if unknown:
    raise ValueError(f"Unknown {kind} config key(s) {unknown}; valid keys: {sorted(fields)}")
  out = dict(defaults)
  name = cfg.get("variant")
  if name is not None:
    base_name, extra = variant_name(name)
    if base_name not in variants:
      raise ValueError(f"Unknown {kind} variant {name!r}; valid variants: "
                       f"{', '.join(valid_names(kind))}")
    out.update(variants[base_name])
    out.update(extra)
  out.update(cfg)  # A given field wins, None included (e.g. final_logits_softcap=None).
  missing = [k for k in fields if k not in out]
  if missing:
    raise ValueError(f"{kind} config needs a `variant` or the field(s) {missing}")
  return out


def _vit_name(name):
  base, _, patch = str(name).partition("/")
  if not patch:
    return base, {}
  if not patch.isdigit():
    raise ValueError(f"Unknown ViT variant {name!r}; valid variants: "
                     f"{', '.join(valid_names('img'))}")
  return base, {"patch_size": int(patch)}


def valid_names(kind):
  if kind == "img":
    return [f"{n}/{p}" for n in VIT_VARIANTS for p in (14, 16)]
  return list(GEMMA_VARIANTS)


def resolve_vit(cfg):
  """Complete ViT config dict from a variant name (e.g. "So400m/14") and overrides (or
  from a ViTConfig)."""
  return _resolve("img", cfg, VIT_VARIANTS, VIT_DEFAULTS, VIT_FIELDS, _vit_name)


def resolve_gemma(cfg):
  """Complete Gemma config dict from a variant name (e.g. "gemma2_2b") and overrides (or
  from a GemmaConfig)."""
  out = _resolve("llm", cfg, GEMMA_VARIANTS, GEMMA_DEFAULTS, GEMMA_FIELDS,
                 lambda n: (n, {}))
  if out["query_pre_attn_scalar"] is None:
    out["query_pre_attn_scalar"] = float(out["head_dim"])
  return out

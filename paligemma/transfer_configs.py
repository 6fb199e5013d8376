"""What transfer configs are built from: the trainer's schema and the pieces they share.

A transfer config is a Python file anywhere on disk (transfers/*.py in this repo, or your
own) whose `get_config(arg)` calls `base_config()` and sets what its recipe needs:

  from paligemma import transfer_configs

  def get_config(arg=None):
    arg = transfer_configs.parse_arg(arg, train="train.jsonl")
    c = transfer_configs.base_config()
    c.input.data = dict(name="jsonl", path=arg.train)
    return c

It lives in the package, not beside the transfer files, so that a config file imports
only `paligemma` and runs from any directory and any install. The trainer rejects keys
that are not in `base_config()`, naming them, so a typo in a config file or on the
command line (`--config.optim.lrr=...`) fails before any work.
"""

import ml_collections
from ml_collections import config_dict

from paligemma import config as config_lib


def base_config():
  """ConfigDict with every trainer key (see paligemma/train.py for what each does)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                       # Model init and RNG key; data order has input.seed.
  c.tokenizer = config_dict.placeholder(str)  # .model path; None: the repo's tiny one.

  # Model: towers as in paligemma/models/variants.py; compute `dtype`, master weights
  # `param_dtype`. model_init: a checkpoint (.npz, HF dir or kaggle: handle), else random.
  c.model = ml_collections.ConfigDict(dict(
      img=dict(variant="So400m/14", image_size=224),
      llm=dict(variant="gemma2_2b"),
      dtype="float32", param_dtype="float32", scan=True, remat_policy="none"))
  c.model_init = config_dict.placeholder(str)

  c.input = ml_collections.ConfigDict(dict(
      data=dict(name="jsonl", path=""),
      image_size=224, text_len=64,
      batch_size=32,               # Global, over all processes and micro-batches.
      seed=0, on_bad_image="skip",
      antialias=True))             # False: big_vision's plain resize(R) (cococap, gqa, ...).
  c.total_epochs = 1.0
  c.total_steps = config_dict.placeholder(int)  # Set: overrides total_epochs.

  # Optimizer (paligemma/optim.py). schedule: the lr multiplier of trained groups.
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", kwargs=dict(b2=0.999), lr=1e-5,
      wd=0.0, wd_mask=config_dict.placeholder(str),
      grad_clip_norm=1.0, accum_steps=1,
      schedule=dict(decay="cosine", warmup_percent=0.05)))
  # Which params train: "full" | "freeze_vision" | "attention_only" | "lora" (only the
  # adapters of config.lora) | [(regex, sched|None)]
  # (paligemma/rules.py: the first regex matching the whole name wins).
  # (Typed `object` so a config may set either a preset name or a list.)
  c.schedule = config_dict.FieldReference("full", field_type=object)
  c.frozen_dtype = config_dict.placeholder(str)  # e.g. "bfloat16": frozen params stored so.
  # LoRA (paligemma/lora.py), off while rank is 0: adapters on the `targets` ("llm",
  # "peft": also SigLIP q/k/v as PEFT's names match, "all", or a regex), update
  # (alpha / rank) * B A x (alpha None: rank); with schedule "lora" only they train.
  # quantize: None | "int8" | "nf4" (QLoRA) stores the frozen matmul weights so.
  # tokens: embedding rows that train too (PEFT's trainable_token_indices): token ids, or
  # "loc" | "seg" | "loc+seg"; a caption base learning detection needs its `<loc>` rows.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=config_dict.placeholder(float), dropout=0.0, targets="llm",
      quantize=config_dict.placeholder(str),
      tokens=config_dict.FieldReference((), field_type=object)))
  c.label_smoothing = 0.0

  # Devices (paligemma/sharding.py, docs/multihost.md). mesh: [(axis, size)], one size
  # -1 (the rest); a ("model", n) axis turns on tensor parallelism. sharding_strategy:
  # where each parameter lives, a preset, "fsdp_tp" (heads / mlp / vocab over "model" if
  # the mesh has it, the rest fsdp over "data"), "fsdp", "replicate" (pure data
  # parallel), or [(regex, rule)] (paligemma/rules.py). (big_vision names this key the
  # same, with rules spelled its own way; its `sharding_rules`, for activations, is
  # `batch_axes` here.)
  # batch_axes: mesh axes the batch is split over. distributed: "auto" calls
  # jax.distributed.initialize() when the environment shows several processes (TPU
  # pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS); True always, False never.
  # (Typed `object` so that the command line takes Python literals:
  # --config.mesh='[("data", 4), ("model", 2)]' --config.sharding_strategy=fsdp.)
  c.mesh = config_dict.FieldReference([("data", -1)], field_type=object)
  c.sharding_strategy = config_dict.FieldReference("fsdp_tp", field_type=object)
  c.batch_axes = config_dict.FieldReference(["data"], field_type=object)
  c.distributed = config_dict.FieldReference("auto", field_type=object)

  c.log_every = 10
  c.ckpt_every = 1000
  c.ckpt_keep = 2
  c.progress = True                # tqdm bar.
  c.evals = ml_collections.ConfigDict()  # name -> evaluator config (paligemma/evaluators).
  c.export_dtype = config_dict.placeholder(str)  # params.npz dtype; None: as trained.
  return c


def parse_arg(arg, **defaults):
  """"key=value,key2=value2" -> ConfigDict of `defaults` updated; values typed as defaults.

  A key not in `defaults` raises, naming it and the valid keys.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}.")
    default = defaults[key]
    if not eq:
      value = "True"
    if isinstance(default, bool):
      out[key] = config_lib.parse_bool(key, value)
    elif default is None:
      out[key] = value
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"Config argument {key}={value!r} is not "
                         f"{type(default).__name__} (default {default!r}).") from None
  return out


def perplexity_eval(data, *, every, batch_size, **kwargs):
  """Validation perplexity on suffix tokens (the first evaluator every config has)."""
  return ml_collections.ConfigDict(dict(type="perplexity", data=data, every=every,
                                        batch_size=batch_size, **kwargs))


# Small random-initialised model for the CPU demo and the tests: an 8x8-patch ViT on
# 32 px images (16 image tokens) and a 2-layer Gemma on the tiny tokenizer's 1920 pieces.
TINY_MODEL = dict(
    img=dict(variant="mu/8", width=64, depth=2, mlp_dim=128, num_heads=2, image_size=32),
    llm=dict(variant="gemma_tiny", vocab_size=1920, final_logits_softcap=None),
    dtype="float32", param_dtype="float32", scan=True, remat_policy="none")

# Released checkpoint names -> their Gemma; the ViT is So400m/14 in all of them.
RELEASED_LLM = (("paligemma2-3b", "gemma2_2b"), ("paligemma2-10b", "gemma2_9b"),
                ("paligemma2-28b", "gemma2_27b"), ("paligemma-3b", "gemma_2b"),
                ("paligemma_3b", "gemma_2b"), ("pt_224", "gemma_2b"), ("pt_448", "gemma_2b"),
                ("pt_896", "gemma_2b"))


def released_llm(checkpoint):
  """The Gemma variant of a released checkpoint, from its name or path (RELEASED_LLM);
  "gemma2_2b" (PaliGemma 2 3B) when the name says nothing."""
  name = str(checkpoint).lower()
  return next((v for k, v in RELEASED_LLM if k in name), "gemma2_2b")


def pretrained_model(checkpoint, image_size=224, dtype="float32", llm_variant=None):
  """Model config for a released checkpoint loaded through `model_init`.

  The variants are named (from the checkpoint's name unless `llm_variant` is given) so
  that loading checks the file is the expected model, and so that `python -m
  paligemma.plan` can size the run without the file.
  """
  llm_variant = llm_variant or released_llm(checkpoint)
  # big_vision's transfers turn off the final logit soft-cap ("better for transfer").
  return dict(img=dict(variant="So400m/14", image_size=image_size),
              llm=dict(variant=llm_variant, final_logits_softcap=0.0),
              dtype=dtype, param_dtype="float32", scan=True, remat_policy="none")


def pretrained_config(checkpoint, tokenizer, image_size=224, dtype="float32"):
  """base_config() set to fine-tune a released checkpoint at `image_size`: the model
  (pretrained_model), `model_init`, the tokenizer and the input resolution."""
  c = base_config()
  c.tokenizer = tokenizer
  c.model = pretrained_model(checkpoint, image_size=image_size, dtype=dtype)
  c.model_init = checkpoint
  c.input.image_size = image_size
  return c


def caption_evals(val_data, *, every, batch_size, max_decode_len):
  """Validation perplexity and captioning metrics (CIDEr, BLEU-4, ...) on `val_data`."""
  return {"val": perplexity_eval(val_data, every=every, batch_size=batch_size),
          "caption": dict(type="caption", data=val_data, every=every, batch_size=batch_size,
                          max_decode_len=max_decode_len)}

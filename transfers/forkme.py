r"""The template to copy for a new task: your images and texts as JSON lines.

  python -m paligemma.train --config transfers/forkme.py:train=data/train.jsonl,val=data/val.jsonl \
      --workdir /tmp/mytask

Each line: {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}
(paths relative to the jsonl file). The recipe is big_vision's forkme.py (sized there for
4 x L4): text_len 128, batch 32, 15 epochs, Adam (b2 0.999), lr 1e-5, decoupled weight
decay 3e-7, clip 1.0, cosine with 5% warmup, both towers trained unless frozen, every
layer recomputed in the backward pass, parameters fully sharded over all devices.

Arguments (`transfers/forkme.py:key=value,...`), the knobs a sweep turns:
  res         image resolution, 224 | 448 | 896 (default 224)
  size        PaliGemma 2 size, 3b | 10b | 28b (default 3b); empty (`size=`): PaliGemma
              1 3B, as in big_vision
  freeze_vit  True: the vision tower and projector (img/*) stay as pretrained
  freeze_llm  True: the language model (llm/*) stays as pretrained
  train, val  the jsonl files (defaults data/train.jsonl, data/val.jsonl)
  tokenizer   the checkpoint's paligemma_tokenizer.model
  checkpoint  default: the released kaggle: handle of `size` at `res`; or any .npz path,
              Hugging Face directory or kaggle: handle (another resolution than `res` is
              resampled)
"""

from paligemma import transfer_configs

# size -> the released checkpoint at resolution {res}; "" is PaliGemma 1, as in big_vision.
RELEASED = {
    "3b": "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-{res}",
    "10b": "kaggle:google/paligemma-2/jax/paligemma2-10b-pt-{res}",
    "28b": "kaggle:google/paligemma-2/jax/paligemma2-28b-pt-{res}",
    "": "kaggle:google/paligemma/jax/paligemma-3b-pt-{res}",
}
RELEASED_RES = (224, 448, 896)


def released_checkpoint(size, res):
  """The kaggle: handle of the released PaliGemma of `size` at `res`."""
  if size not in RELEASED:
    raise ValueError(f"size={size!r} is not released; use one of {list(RELEASED)} ('': "
                     "PaliGemma 1 3B), or give checkpoint=.")
  if res not in RELEASED_RES:
    raise ValueError(f"res={res} has no released checkpoint; use one of {RELEASED_RES}, or "
                     "give checkpoint= (its position embedding is resampled to res).")
  return RELEASED[size].format(res=res)


def get_config(arg=None):
  # Only what a sweep changes, or what changes several keys at once, is an argument;
  # anything else is set below (or with --config.KEY=VALUE).
  arg = transfer_configs.parse_arg(
      arg, res=224, size="3b", freeze_vit=False, freeze_llm=False,
      train="data/train.jsonl", val="data/val.jsonl", tokenizer="paligemma_tokenizer.model",
      checkpoint="")
  c = transfer_configs.base_config()

  # Data: resized as big_vision's decode|resize(res, antialias=True)|value_range(-1, 1).
  c.input.data = dict(name="jsonl", path=arg.train)
  c.input.image_size = arg.res
  c.input.text_len = 128
  c.input.batch_size = 32
  c.total_epochs = 15
  c.tokenizer = arg.tokenizer

  # Optimisation.
  c.optim.name = "adam"
  c.optim.kwargs = dict(b2=0.999)
  c.optim.lr = 1e-5
  c.optim.wd = 3e-7
  c.optim.grad_clip_norm = 1.0
  c.label_smoothing = 0.0

  # Learning-rate schedule per group; None freezes the group. "default" is
  # c.optim.schedule, so that --config.optim.schedule.* changes both groups.
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)
  sched = "default"
  c.schedule = [
      ("img/.*", None if arg.freeze_vit else sched),
      ("llm/.*", None if arg.freeze_llm else sched),
  ]

  # Model: SigLIP So400m/14 at `res` and the Gemma of the checkpoint, named so that
  # loading checks the file is this model and `python -m paligemma.plan` can size the run
  # without it.
  c.model_init = arg.checkpoint or released_checkpoint(arg.size, arg.res)
  c.model.img = dict(variant="So400m/14", image_size=arg.res)
  c.model.llm = dict(variant=transfer_configs.released_llm(c.model_init),
                     final_logits_softcap=0.0)  # Off: better for transfer (big_vision).
  c.model.dtype = "bfloat16"        # Compute; the trained weights stay float32.
  c.model.param_dtype = "float32"
  c.model.scan = True
  # Every layer of both towers recomputed in the backward pass, as big_vision's ViT and
  # Gemma do by default (kept instead, activations are most of a device's memory).
  c.model.remat_policy = "nothing_saveable"

  # Devices: every parameter fully sharded over all devices (big_vision's
  # sharding_strategy [(".*", 'fsdp(axis="data")')]), the batch split over "data".
  c.mesh = [("data", -1)]
  c.sharding_strategy = [(".*", "fsdp:data")]
  c.batch_axes = ["data"]

  c.log_every = 10
  c.ckpt_every = 500
  val = dict(name="jsonl", path=arg.val)
  c.evals = transfer_configs.caption_evals(val, every=500, batch_size=32, max_decode_len=128)
  c.export_dtype = "bfloat16"
  return c

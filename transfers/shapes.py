r"""Synthetic shapes on a small random-initialised model: the demo that runs anywhere.

  python -m paligemma.train --config transfers/shapes.py --workdir /tmp/shapes
  python -m paligemma.train --config transfers/shapes.py:task=detect --workdir /tmp/det
  python -m paligemma.train --config transfers/shapes.py:task=segment --workdir /tmp/seg

Needs nothing outside the repo (data drawn on the fly, the tiny tokenizer). On 2 CPU
cores the caption task reaches >= 90% exact-match on held-out images in a few minutes.
The segment task ("segment circle" -> `<loc>`x4 `<seg>`x16 circle) encodes masks with
the shapes VQ-VAE (`vae`, default "shapes": `paligemma/assets/make_shapes_vae.py`,
trained on first use in about a minute) and reports mIoU on held-out images.
Arguments (`:key=value,...`): task (caption | detect | segment), steps, batch_size,
evals (False: no periodic evaluation, for quick checks), vae (segment: the VAE's path).
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(arg, task="caption", steps=0, batch_size=32, evals=True,
                                   vae="shapes")
  detect, segment = arg.task == "detect", arg.task == "segment"
  c = transfer_configs.base_config()

  c.model = transfer_configs.TINY_MODEL
  c.input.image_size = 32
  c.input.text_len = 32 if segment else 24 if detect else 12
  c.input.batch_size = arg.batch_size
  vae = dict(vae=arg.vae) if segment else {}
  c.input.data = dict(name="shapes", task=arg.task, num_examples=100_000, seed=0,
                      image_size=32, **vae)
  c.total_steps = arg.steps or (1500 if detect or segment else 800)

  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.wd = 1e-4
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)
  c.schedule = "full"

  c.log_every = 25
  c.ckpt_every = 200
  c.export_dtype = "float32"

  if not arg.evals:
    return c
  # Held-out images: another seed of the generator.
  val = dict(name="shapes", task=arg.task, num_examples=256, seed=1, image_size=32, **vae)
  c.evals.val = transfer_configs.perplexity_eval(val, every=c.total_steps // 4, batch_size=64)
  if segment:
    c.evals.segment = dict(type="segmentation", data=val, every=c.total_steps, batch_size=64,
                           max_decode_len=c.input.text_len, vae=arg.vae)
  elif detect:
    c.evals.detect = dict(type="detection", data=val, every=c.total_steps, batch_size=64,
                          max_decode_len=c.input.text_len)
  else:
    c.evals.caption = dict(type="exact_match", data=val, every=c.total_steps, batch_size=64,
                           max_decode_len=c.input.text_len)
  return c

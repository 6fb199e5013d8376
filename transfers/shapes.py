r"""Synthetic shapes on a small random-initialised model: the demo that runs anywhere.

  python -m paligemma.train --config transfers/shapes.py --workdir /tmp/shapes
  python -m paligemma.train --config transfers/shapes.py:task=detect --workdir /tmp/det

Needs nothing outside the repo (data drawn on the fly, the tiny tokenizer). On 2 CPU
cores the caption task reaches >= 90% exact-match on held-out images in a few minutes.
Arguments (`:key=value,...`): task (caption | detect), steps, batch_size, evals (False:
no periodic evaluation, for quick checks).
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(arg, task="caption", steps=0, batch_size=32, evals=True)
  detect = arg.task == "detect"
  c = transfer_configs.base_config()

  c.model = transfer_configs.TINY_MODEL
  c.input.image_size = 32
  c.input.text_len = 24 if detect else 12
  c.input.batch_size = arg.batch_size
  c.input.data = dict(name="shapes", task=arg.task, num_examples=100_000, seed=0,
                      image_size=32)
  c.total_steps = arg.steps or (1500 if detect else 800)

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
  val = dict(name="shapes", task=arg.task, num_examples=256, seed=1, image_size=32)
  c.evals.val = transfer_configs.perplexity_eval(val, every=c.total_steps // 4, batch_size=64)
  if detect:
    c.evals.detect = dict(type="detection", data=val, every=c.total_steps, batch_size=64,
                          max_decode_len=c.input.text_len)
  else:
    c.evals.caption = dict(type="exact_match", data=val, every=c.total_steps, batch_size=64,
                           max_decode_len=c.input.text_len)
  return c

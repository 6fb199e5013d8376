r"""LoRA on the shapes demo: adapters on a trained shapes model learn a new task.

  python -m paligemma.train --config transfers/shapes.py --workdir /tmp/shapes
  python -m paligemma.train --config transfers/shapes_lora.py:base=/tmp/shapes \
      --workdir /tmp/shapes_lora

The base is the caption model of the first command (its params.npz, frozen); rank-`rank`
adapters on the LLM's attention and MLP weights and SigLIP's q/k/v (targets "peft"), and
the embedding rows of the `<loc>` tokens the task uses (lora.tokens), learn
`detect circle ; square ; triangle`. The caption model never saw a `<loc>` token: its rows
of them are still random, and without training them the boxes stay rough (mean IoU about
0.5 instead of 0.9). The trainer writes them to
/tmp/shapes_lora/adapter (a PEFT adapter directory); predict and evaluate take it with
`--adapter`. Arguments (`:key=value,...`): base, rank, steps, batch_size, quantize
(None | int8 | nf4: the frozen base stored so, QLoRA), evals.
"""

from paligemma import tokenizer
from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(arg, base="/tmp/shapes", rank=4, steps=0, batch_size=32,
                                   quantize="", evals=True)
  c = transfer_configs.base_config()
  c.model = transfer_configs.TINY_MODEL
  c.model_init = f"{arg.base.rstrip('/')}/params.npz"
  c.input.image_size = 32
  c.input.text_len = 24
  c.input.batch_size = arg.batch_size
  c.input.data = dict(name="shapes", task="detect", num_examples=100_000, seed=0,
                      image_size=32)
  c.total_steps = arg.steps or 2500

  # The boxes' corners lie on the 32-pixel grid: 33 of the 1024 <loc> tokens occur.
  loc0 = c.model.llm.vocab_size - tokenizer.NUM_LOC - tokenizer.NUM_SEG
  tokens = sorted({loc0 + round(i / 32 * tokenizer.LOC_FACTOR) for i in range(33)})
  c.lora.update(rank=arg.rank, alpha=float(arg.rank), dropout=0.0, targets="peft",
                quantize=arg.quantize or None, tokens=tokens)
  c.schedule = "lora"
  c.optim.name = "adam"
  c.optim.lr = 1e-2
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)

  c.log_every = 25
  c.ckpt_every = 200

  if not arg.evals:
    return c
  val = dict(name="shapes", task="detect", num_examples=256, seed=1, image_size=32)
  c.evals.val = transfer_configs.perplexity_eval(val, every=c.total_steps // 4, batch_size=64)
  c.evals.detect = dict(type="detection", data=val, every=c.total_steps, batch_size=64,
                        max_decode_len=c.input.text_len)
  return c

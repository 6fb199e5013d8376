r"""big_vision's Colab T4 recipe: PaliGemma 2 3B-224 fine-tuned on one free 16 GB T4.

  python -m paligemma.train \
      --config transfers/colab_t4.py:checkpoint=paligemma2-3b-pt-224.b16.npz,data=train.jsonl \
      --workdir /tmp/colab_t4

notebooks/finetune_paligemma.ipynb runs this recipe, the one big_vision's own T4 notebook
(its finetune_paligemma.ipynb) trains with: only the LLM's attention layers
(llm/layers/attn/*, 368M parameters) are trained, kept in float32; everything else
(2.66B) is frozen and stored in float16; plain SGD (no momentum, no weight decay, no
clipping), lr 0.03 with a cosine decay after a 10% warm-up; batch 8, 64 steps, text_len
128, 224 px; captions from a jsonl file. big_vision reports the loss going from 3.23 to
0.09 on its 90 long captions, about 17 minutes on a T4.

Arguments (`transfers/colab_t4.py:key=value,...`):
  checkpoint  .npz path, Hugging Face directory or `kaggle:` handle of PaliGemma 2 3B-224
              (default kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224); a name with
              "paligemma-3b" in it selects PaliGemma 1 (see paligemma/transfer_configs.py).
  data        the training jsonl (default data/train.jsonl): one
              {"image": ..., "prefix": "caption en", "suffix": ...} per line, image paths
              relative to the file (paligemma/data/jsonl.py).
  val         a validation jsonl: perplexity and caption metrics every 16 steps and at
              the end (default: none, no evaluation while training).
  tokenizer   the checkpoint's paligemma_tokenizer.model (default: that file name).
  steps       training steps (default 64).

Memory on the T4 (`python -m paligemma.plan --config transfers/colab_t4.py --device t4`,
about 10 of 15 usable GiB): float16, not bfloat16, for the frozen weights because the T4
has no bfloat16 arithmetic (XLA would widen whole stacks of weights to float32); compute
in float32 with each layer's weights cast as it runs; SGD keeps no optimizer state; and
remat "nothing_saveable" recomputes each layer in the backward pass (and the output layer
in vocabulary chunks) instead of holding batch 8 x 384 tokens of activations for 26 layers.
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224",
      data="data/train.jsonl", val="", tokenizer="paligemma_tokenizer.model", steps=64)
  # Model: the released checkpoint at 224 px, float32 compute; layers recomputed in backward.
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=224)
  c.model.remat_policy = "nothing_saveable"

  # Data: captions from a jsonl file.
  c.input.data = dict(name="jsonl", path=arg.data)
  c.input.text_len = 128
  c.input.batch_size = 8
  c.total_steps = arg.steps

  # Optimisation: plain SGD on the attention layers; the rest frozen in float16.
  c.optim.name = "sgd"
  c.optim.kwargs = {}
  c.optim.lr = 0.03
  c.optim.wd = 0.0
  c.optim.grad_clip_norm = 0.0  # No clipping.
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.10)
  c.schedule = "attention_only"
  c.frozen_dtype = "float16"

  c.log_every = 4
  c.ckpt_every = arg.steps  # One checkpoint, at the end.
  if arg.val:
    val = dict(name="jsonl", path=arg.val)
    c.evals = transfer_configs.caption_evals(val, every=16, batch_size=8, max_decode_len=64)
  c.export_dtype = "float16"
  return c

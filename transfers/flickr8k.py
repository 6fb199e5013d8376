r"""Flickr8k captions, the brief's JAX recipe: only the attention layers train.

  python -m paligemma.train \
      --config transfers/flickr8k.py:directory=/data/flickr8k,checkpoint=kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224 \
      --workdir /tmp/flickr8k

`directory` holds captions.txt and Images/ (Kaggle adityajn105/flickr8k). Recipe: attention
layers only (llm/layers/attn/*), lr 5e-5, batch 10, 10 epochs, text_len 128, 224 px,
1200 train / 300 validation images, fine-tuned params exported as float16 .npz.
The frozen rest is kept in bfloat16 (no gradients, no optimizer state), as in the T4 Colab.
Arguments: directory, checkpoint, tokenizer.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(
      arg, directory="flickr8k", tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  c = common.base_config()
  c.tokenizer = arg.tokenizer

  c.model = common.pretrained_model(arg.checkpoint, image_size=224)
  c.model_init = arg.checkpoint

  c.input.data = dict(name="flickr8k", directory=arg.directory, split="train",
                      train_size=1200, val_size=300)
  c.input.image_size = 224
  c.input.text_len = 128
  c.input.batch_size = 10
  c.total_epochs = 10

  c.optim.name = "adam"
  c.optim.lr = 5e-5
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)
  c.schedule = "attention_only"
  c.frozen_dtype = "bfloat16"

  c.log_every = 10
  c.ckpt_every = 500
  val = dict(name="flickr8k", directory=arg.directory, split="validation", train_size=1200,
             val_size=300)
  c.evals = common.caption_evals(val, every=1000, batch_size=10, max_decode_len=64)
  c.export_dtype = "float16"
  return c

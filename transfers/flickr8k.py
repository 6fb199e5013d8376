r"""Flickr8k captions on one 16 GB T4: only the language model's attention layers train.

  python -m paligemma.train \
      --config transfers/flickr8k.py:directory=/data/flickr8k,checkpoint=kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224 \
      --workdir /tmp/flickr8k

`directory` holds captions.txt and Images/ (Kaggle adityajn105/flickr8k). Recipe: attention
layers only (llm/layers/attn/*), lr 5e-5, batch 10, 10 epochs, text_len 128, 224 px,
1200 train / 300 validation images, fine-tuned params exported as float16 .npz.
Arguments: directory, checkpoint, tokenizer.

Memory: sized to fit one 16 GB T4 (`python -m paligemma.plan --config transfers/flickr8k.py
--device t4`: about 12.8 of 15 usable GiB):
  - the trained attention weights (368M) stay float32, with Adam state and gradients;
  - the frozen rest (2.66B: no gradients, no optimizer state) is stored in float16, not
    bfloat16: the T4 has no bfloat16 arithmetic and XLA widens bfloat16 to float32, a
    whole stack of layer weights at a time (6+ GB more); computation stays float32, each
    layer's weights cast as it runs;
  - remat_policy "nothing_saveable": the backward pass recomputes each layer from its
    input instead of keeping its activations (about 40 GiB at batch 10 x 384 tokens, 1 GiB
    with remat; a third more compute), and the output layer computes its 257k-wide logits
    in vocabulary chunks, forward and backward (trainer/loss.py).
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, directory="flickr8k", tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=224)

  c.input.data = dict(name="flickr8k", directory=arg.directory, split="train",
                      train_size=1200, val_size=300)
  c.input.text_len = 128
  c.input.batch_size = 10
  c.total_epochs = 10

  c.optim.name = "adam"
  c.optim.lr = 5e-5
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)
  c.schedule = "attention_only"
  c.frozen_dtype = "float16"  # The T4 has no bfloat16 (see the docstring).
  c.model.remat_policy = "nothing_saveable"

  c.log_every = 10
  c.ckpt_every = 500
  val = dict(name="flickr8k", directory=arg.directory, split="validation", train_size=1200,
             val_size=300)
  c.evals = transfer_configs.caption_evals(val, every=1000, batch_size=10, max_decode_len=64)
  c.export_dtype = "float16"
  return c

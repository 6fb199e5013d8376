r"""Tuxemon monster captions from the Hugging Face Hub (diffusers/tuxemon) on one 16 GB GPU.

  python -m paligemma.train --config transfers/tuxemon.py:checkpoint=$CKPT,tokenizer=$TOKENIZER \
      --workdir /tmp/tuxemon

The dataset (251 images, 44 MB, columns `image`, `blip_caption`, `gpt4_turbo_caption`) is
read with `datasets` (the `hf` source): downloaded on first use into the Hugging Face
cache, then read from there (also with HF_HUB_OFFLINE=1). Images 0-199 train, 200-250
validate. Prompt "caption en", target the BLIP caption (`caption=gpt4_turbo_caption` for
the longer GPT-4 ones, with text_len 128).

Recipe: as transfers/flickr8k.py, sized for a T4: attention layers of the language model
only (lr 5e-5, cosine), the frozen rest in float16, layers recomputed in the backward
pass; batch 8, 10 epochs (250 steps), text_len 64, 224 px; validation perplexity and
captioning metrics at the end. Arguments: data (a hub name, a parquet folder or a
save_to_disk directory of the same columns), caption, checkpoint, tokenizer.
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, data="diffusers/tuxemon", caption="blip_caption",
      tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=224)

  c.input.data = dict(name="hf", path=arg.data, split="train[:200]", image="image",
                      prefix="caption en", suffix=arg.caption)
  c.input.text_len = 128 if arg.caption.startswith("gpt4") else 64
  c.input.batch_size = 8
  c.total_epochs = 10

  c.optim.name = "adam"
  c.optim.lr = 5e-5
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)
  c.schedule = "attention_only"
  c.frozen_dtype = "float16"
  c.model.remat_policy = "nothing_saveable"

  c.log_every = 10
  c.ckpt_every = 100
  val = dict(c.input.data, split="train[200:]")
  c.evals = transfer_configs.caption_evals(val, every=250, batch_size=8,
                                           max_decode_len=c.input.text_len)
  c.export_dtype = "float16"
  return c

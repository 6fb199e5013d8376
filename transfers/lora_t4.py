r"""LoRA and QLoRA on one GPU: PaliGemma 2 adapters trained, the base frozen (PEFT's recipe).

  python -m paligemma.train \
      --config transfers/lora_t4.py:checkpoint=paligemma2-3b-pt-224.b16.npz,data=train.jsonl \
      --workdir /tmp/lora_t4
  python -m paligemma.plan --config transfers/lora_t4.py --device t4

Rank-8 adapters (alpha 8, as PEFT's default) on the LLM's q/k/v/o and gate/up/down
projections and SigLIP's q/k/v ("peft": the modules PEFT's PaliGemma recipe names), Adam
at lr 3e-4; nothing else trains. The base stays frozen in float16 (the T4 has no
bfloat16 arithmetic), or in 4-bit NormalFloat with `quantize=nf4` (QLoRA). Layers are
recomputed in the backward pass (remat "nothing_saveable"). At the end the workdir holds
`adapter/`, a PEFT adapter directory: `python -m paligemma.predict --checkpoint BASE
--adapter /tmp/lora_t4/adapter`, or transformers + peft's `PeftModel.from_pretrained`.

Arguments (`transfers/lora_t4.py:key=value,...`):
  size        3b (default), 10b or 28b: PaliGemma 2 at 224 px
  checkpoint  .npz, Hugging Face directory or `kaggle:` handle (default: Kaggle's of `size`)
  quantize    "" (float16 base), nf4 (QLoRA) or int8
  rank        adapter rank (default 8)
  data, val   training / validation jsonl ({"image", "prefix", "suffix"} per line)
  tokenizer   the checkpoint's paligemma_tokenizer.model
  steps, batch_size, text_len   (defaults 256, 8, 128)

What fits (`python -m paligemma.plan`, README "LoRA and QLoRA"): 3B LoRA and 10B QLoRA on a
16 GB T4; 28B QLoRA on one 24 GB GPU.
"""

from paligemma import transfer_configs

_KAGGLE = "kaggle:google/paligemma-2/jax/paligemma2-{size}-pt-224"


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, size="3b", checkpoint="", quantize="", rank=8, data="data/train.jsonl", val="",
      tokenizer="paligemma_tokenizer.model", steps=256, batch_size=8, text_len=128)
  if arg.size not in ("3b", "10b", "28b"):
    raise ValueError(f"size={arg.size!r}: valid sizes are 3b, 10b, 28b")
  checkpoint = arg.checkpoint or _KAGGLE.format(size=arg.size)
  c = transfer_configs.pretrained_config(checkpoint, arg.tokenizer, image_size=224)
  c.model.remat_policy = "nothing_saveable"

  c.input.data = dict(name="jsonl", path=arg.data)
  c.input.text_len = arg.text_len
  c.input.batch_size = arg.batch_size
  c.total_steps = arg.steps

  # Only the adapters train; the base is frozen in float16 or quantized.
  c.lora.update(rank=arg.rank, alpha=8.0, dropout=0.0, targets="peft",
                quantize=arg.quantize or None)
  c.schedule = "lora"
  c.frozen_dtype = "float16"
  c.optim.name = "adam"
  c.optim.lr = 3e-4
  c.optim.wd = 0.0
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)

  c.log_every = 8
  c.ckpt_every = 64
  if arg.val:
    val = dict(name="jsonl", path=arg.val)
    c.evals = transfer_configs.caption_evals(val, every=64, batch_size=8, max_decode_len=64)
  return c

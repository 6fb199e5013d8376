r"""COCO captions from a jsonl export (paligemma/data/coco_to_jsonl.py).

  python -m paligemma.train --config transfers/cococap.py:train=coco/train.jsonl,val=coco/val.jsonl \
      --workdir /tmp/cococap

Recipe: 224 px, text_len 64, batch 32, 1 epoch, Adam lr 1e-5, cosine with 5% warmup, both
towers trained, bfloat16 compute on float32 weights, export bfloat16.
Arguments: train, val, tokenizer, checkpoint.
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, train="coco/train.jsonl", val="coco/val.jsonl",
      tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=224,
                                         dtype="bfloat16")

  c.input.data = dict(name="jsonl", path=arg.train)
  c.input.text_len = 64
  c.input.batch_size = 32
  c.total_epochs = 1

  c.optim.lr = 1e-5
  c.optim.wd = 1e-6
  c.schedule = "full"

  c.ckpt_every = 1000
  val = dict(name="jsonl", path=arg.val)
  c.evals = transfer_configs.caption_evals(val, every=2000, batch_size=32, max_decode_len=64)
  c.export_dtype = "bfloat16"
  return c

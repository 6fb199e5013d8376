r"""Referring segmentation, big_vision's refcoco_seg recipe: sentence -> `<loc>`x4 `<seg>`x16.

  python -m paligemma.train \
      --config transfers/refcoco_seg.py:train=refcoco_train.jsonl,val=refcoco_val.jsonl,vae=vae-oid.npz \
      --workdir /tmp/refcoco

Data: RefCOCO-style jsonl files (`paligemma.data.refcoco`: one referred object per line,
{"image", "prefix", "mask": PNG path}); masks encoded with big_vision's mask VQ-VAE
(`vae`: vae-oid.npz, from storage.googleapis.com/big_vision/paligemma/vae-oid.npz).
Recipe (big_vision transfers/refcoco_seg.py): `res` 448 px (224 also reported), text_len
48, batch 64, 5 epochs, Adam b2 0.999 lr 1e-5, cosine with 5% warmup, label smoothing
0.3, both towers trained. big_vision reports validation mIoU 75.6 / 69.8 / 70.2 on
refcoco / refcoco+ / refcocog at 448 px (73.4 / 68.3 / 67.7 at 224 px).
Arguments: train, val, vae, res, tokenizer, checkpoint (default: the released pt
checkpoint at `res`).
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, train="refcoco_train.jsonl", val="refcoco_val.jsonl", vae="vae-oid.npz", res=448,
      tokenizer="paligemma_tokenizer.model", checkpoint="")
  checkpoint = arg.checkpoint or f"kaggle:google/paligemma-2/jax/paligemma2-3b-pt-{arg.res}"
  c = transfer_configs.pretrained_config(checkpoint, arg.tokenizer, image_size=arg.res,
                                         dtype="bfloat16")

  c.input.data = dict(name="refcoco", path=arg.train, vae=arg.vae)
  c.input.text_len = 48
  c.input.batch_size = 64
  c.total_epochs = 5

  c.optim.lr = 1e-5
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)
  c.label_smoothing = 0.3
  c.schedule = "full"
  if arg.res >= 448:
    c.model.remat_policy = "nothing_saveable"  # 1024 image tokens: trade compute for memory.

  c.ckpt_every = 1000
  val = dict(name="refcoco", path=arg.val, vae=arg.vae)
  c.evals.val = transfer_configs.perplexity_eval(val, every=1000, batch_size=64)
  c.evals.segment = dict(type="segmentation", data=val, every=2000, batch_size=64,
                         max_decode_len=24, vae=arg.vae)
  c.export_dtype = "bfloat16"
  return c

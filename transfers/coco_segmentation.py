r"""COCO instance segmentation: "segment cat ; dog" -> "<loc..>x4<seg..>x16 cat ; ...".

  python -m paligemma.train \
      --config transfers/coco_segmentation.py:annotations=coco/annotations/instances_train2017.json,images=coco/train2017,vae=vae-oid.npz \
      --workdir /tmp/cocoseg

Masks (COCO polygons or RLE) are encoded with big_vision's mask VQ-VAE (`vae`: the path
of vae-oid.npz, from storage.googleapis.com/big_vision/paligemma/vae-oid.npz) as
big_vision's refcoco_mask2str, each object 20 tokens. Recipe as big_vision's
refcoco_seg: 448 px, label smoothing 0.3, Adam b2 0.999 lr 1e-5, cosine with 5% warmup,
both towers trained, batch 64; text_len 128 (several objects per image, where RefCOCO
has one in 48 tokens), 2 epochs. Validation: perplexity, and mIoU / cIoU / box accuracy
(`segmentation` evaluator) on the first 500 images.
Arguments: annotations, images, val_annotations, val_images, vae, tokenizer, checkpoint.
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, annotations="coco/annotations/instances_train2017.json", images="coco/train2017",
      val_annotations="coco/annotations/instances_val2017.json", val_images="coco/val2017",
      vae="vae-oid.npz", tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-448")
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=448,
                                         dtype="bfloat16")

  c.input.data = dict(name="coco_segmentation", annotations=arg.annotations,
                      images=arg.images, vae=arg.vae, shuffle_objects=True)
  c.input.text_len = 128
  c.input.batch_size = 64
  c.total_epochs = 2

  c.optim.lr = 1e-5
  c.label_smoothing = 0.3
  c.schedule = "full"
  c.model.remat_policy = "nothing_saveable"  # 1024 image tokens: trade compute for memory.

  c.ckpt_every = 1000
  val = dict(name="coco_segmentation", annotations=arg.val_annotations, images=arg.val_images,
             vae=arg.vae)
  c.evals.val = transfer_configs.perplexity_eval(val, every=1000, batch_size=32)
  c.evals.segment = dict(type="segmentation", data=val, every=2000, batch_size=32,
                         max_decode_len=128, vae=arg.vae, num_examples=500)
  c.export_dtype = "bfloat16"
  return c

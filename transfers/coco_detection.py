r"""COCO object detection: "detect cat ; dog" -> "<loc..>x4 cat ; <loc..>x4 dog".

  python -m paligemma.train \
      --config transfers/coco_detection.py:annotations=coco/annotations/instances_train2017.json,images=coco/train2017 \
      --workdir /tmp/cocodet

Recipe: 448 px (boxes need resolution), text_len 128, batch 32, 2 epochs, Adam lr 1e-5,
vision tower frozen, bfloat16 compute. Validation: perplexity and COCO mAP.
Arguments: annotations, images, val_annotations, val_images, tokenizer, checkpoint.
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, annotations="coco/annotations/instances_train2017.json", images="coco/train2017",
      val_annotations="coco/annotations/instances_val2017.json", val_images="coco/val2017",
      tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-448")
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=448,
                                         dtype="bfloat16")

  c.input.data = dict(name="coco_detection", annotations=arg.annotations, images=arg.images,
                      shuffle_objects=True)
  c.input.text_len = 128
  c.input.batch_size = 32
  c.total_epochs = 2

  c.optim.lr = 1e-5
  c.schedule = "freeze_vision"
  c.frozen_dtype = "bfloat16"
  c.model.remat_policy = "nothing_saveable"  # 1024 image tokens: trade compute for memory.

  c.ckpt_every = 1000
  val = dict(name="coco_detection", annotations=arg.val_annotations, images=arg.val_images)
  c.evals.val = transfer_configs.perplexity_eval(val, every=2000, batch_size=32)
  c.evals.detection = dict(type="detection", data=val, every=4000, batch_size=32,
                           max_decode_len=128)
  c.export_dtype = "bfloat16"
  return c

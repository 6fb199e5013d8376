r"""VQAv2-style question answering: "answer en {question}" -> the answer.

  python -m paligemma.train \
      --config transfers/vqa.py:questions=vqa/q_train.json,annotations=vqa/a_train.json,images=vqa/train2014 \
      --workdir /tmp/vqa

Recipe: 224 px, text_len 64, batch 32, 1 epoch, Adam lr 1e-5, both towers trained.
Validation: perplexity and VQA accuracy (min(#humans that said it / 3, 1)).
Arguments: questions, annotations, images, val_questions, val_annotations, val_images,
tokenizer, checkpoint.
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, questions="vqa/questions_train.json", annotations="vqa/annotations_train.json",
      images="vqa/train2014", val_questions="vqa/questions_val.json",
      val_annotations="vqa/annotations_val.json", val_images="vqa/val2014",
      tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=224,
                                         dtype="bfloat16")

  c.input.data = dict(name="vqa", questions=arg.questions, annotations=arg.annotations,
                      images=arg.images)
  c.input.text_len = 64
  c.input.batch_size = 32
  c.total_epochs = 1

  c.optim.lr = 1e-5
  c.schedule = "full"

  c.ckpt_every = 1000
  val = dict(name="vqa", questions=arg.val_questions, annotations=arg.val_annotations,
             images=arg.val_images)
  c.evals.val = transfer_configs.perplexity_eval(val, every=2000, batch_size=32)
  c.evals.vqa = dict(type="vqa", data=val, every=4000, batch_size=32, max_decode_len=16)
  c.export_dtype = "bfloat16"
  return c

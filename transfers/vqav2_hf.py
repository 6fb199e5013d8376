r"""VQAv2 from a Hugging Face mirror in parquet: "answer en {question}" -> the answer.

  python -m paligemma.train --config transfers/vqav2_hf.py:checkpoint=$CKPT,tokenizer=$TOKENIZER \
      --workdir /tmp/vqav2

`data` is a hub dataset (default lmms-lab/VQAv2, whose splits are validation, testdev
and test: this recipe trains on validation past its first 10,000 questions and
validates on the first 1,000), or a local folder / save_to_disk directory, with the
VQAv2 columns: `image`, `question`, `multiple_choice_answer` (the target), `answers`
(the ten annotators' {"answer", ...}, the references of the VQA accuracy) and
`question_id`. `streaming=True` trains from a stream instead of downloading the split
(then `train` must be a whole split, e.g. `train=validation`, and the shuffle is
datasets' buffer; validation is still downloaded).

Recipe: big_vision's VQAv2 transfer at 224 px: text_len 64, batch 32, 1 epoch, Adam lr
1e-5, both towers trained; validation perplexity and VQA accuracy. Arguments: data,
train, val, streaming, checkpoint, tokenizer.
"""

from paligemma import transfer_configs


def get_config(arg=None):
  arg = transfer_configs.parse_arg(
      arg, data="lmms-lab/VQAv2", train="validation[10000:]", val="validation[:1000]",
      streaming=False, tokenizer="paligemma_tokenizer.model",
      checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224")
  c = transfer_configs.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=224,
                                         dtype="bfloat16")

  columns = dict(name="hf", path=arg.data, image="image", prefix="answer en {question}",
                 suffix="multiple_choice_answer", references="answers", id="question_id")
  c.input.data = dict(columns, split=arg.train, streaming=arg.streaming)
  c.input.text_len = 64
  c.input.batch_size = 32
  c.total_epochs = 1

  c.optim.lr = 1e-5
  c.schedule = "full"

  c.ckpt_every = 1000
  val = dict(columns, split=arg.val)
  c.evals.val = transfer_configs.perplexity_eval(val, every=2000, batch_size=32)
  c.evals.vqa = dict(type="vqa", data=val, every=4000, batch_size=32, max_decode_len=16)
  c.export_dtype = "bfloat16"
  return c

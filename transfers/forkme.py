r"""The template to copy for a new task: your images and texts as JSON lines.

  python -m paligemma.train --config transfers/forkme.py:train=data/train.jsonl,val=data/val.jsonl \
      --workdir /tmp/mytask

Each line: {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}
(paths relative to the jsonl file). Recipe from big_vision's forkme.py (4x L4): 224 px,
text_len 128, batch 32, 15 epochs, Adam (b2 0.999), lr 1e-5, decoupled weight decay
3e-7, clip 1.0, cosine with 5% warmup, both towers trained.
Arguments: train, val (jsonl paths), checkpoint (path, HF dir or kaggle: handle),
tokenizer (the checkpoint's paligemma_tokenizer.model).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, train="data/train.jsonl", val="data/val.jsonl",
                         checkpoint="kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224",
                         tokenizer="paligemma_tokenizer.model")
  # Model: a released checkpoint (path, HF dir or kaggle: handle) at 224 px, its
  # tokenizer, and the input resolution to match.
  c = common.pretrained_config(arg.checkpoint, arg.tokenizer, image_size=224)

  # Data.
  c.input.data = dict(name="jsonl", path=arg.train)
  c.input.text_len = 128
  c.input.batch_size = 32
  c.total_epochs = 15

  # Optimisation: which groups train and how.
  c.optim.name = "adam"
  c.optim.kwargs = dict(b2=0.999)
  c.optim.lr = 1e-5
  c.optim.wd = 3e-7
  c.optim.grad_clip_norm = 1.0
  c.optim.schedule = dict(decay="cosine", warmup_percent=0.05)
  c.schedule = [("img/.*", "default"), ("llm/.*", "default")]  # None freezes a group.

  # Devices: fully sharded params over all devices; bfloat16 compute, float32 weights.
  c.model.dtype = "bfloat16"
  c.mesh = [("data", -1)]
  c.sharding_rules = [(".*", "fsdp")]

  c.log_every = 10
  c.ckpt_every = 500
  val = dict(name="jsonl", path=arg.val)
  c.evals = common.caption_evals(val, every=500, batch_size=32, max_decode_len=128)
  c.export_dtype = "bfloat16"
  return c

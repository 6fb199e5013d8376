"""The one place where a prompt becomes tokens and masks (big_vision's layout).

Training (`mode="train"`), length text_len + 1 (the trainer feeds text[:-1] and predicts
text[1:]):

  text       [bos] prefix "\\n" suffix [eos] 0 0 ...
  mask_ar      0     0     0     1      1   1 1      (1 on padding, as big_vision)
  mask_loss    0     0     0     1      1   0 0

Evaluation / decoding (`mode="eval"`), length text_len:

  text       [bos] prefix "\\n" [forced suffix start, no eos] 0 0 ...
  mask_ar      0     0     0     1 ...                          1 1
  mask_input   1     1     1     1 ...                          0 0

The prefix and the "\\n" separator are tokenized separately (big_vision's
`masked_concat(["prefix", "septok", "suffix"])`); with "\\n" a user-defined piece this
is the same as tokenizing `prefix + "\\n"`. A sequence longer than its length is cut
at the end (losing eos, then suffix, then prefix tokens) and reported as truncated.
"""

import numpy as np

SEPARATOR = "\n"


def assemble(tokenizer, prefix, suffix=None, *, text_len, mode="train"):
  """({text, mask_ar, mask_loss | mask_input}: int32[L], truncated: bool) for one example.

  L = text_len + 1 in "train" mode, text_len in "eval" mode; text_len=None (eval only)
  returns the unpadded sequence, for decoding one prompt at a time.
  """
  if mode not in ("train", "eval"):
    raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
  if mode == "train" and suffix is None:
    raise ValueError(f"Training example with prefix {prefix!r} has no suffix (target text).")
  prompt = tokenizer.encode(prefix, bos=True) + tokenizer.encode(SEPARATOR)
  # An empty training suffix still gives [eos]: the model learns to stop.
  target = tokenizer.encode(suffix or "", eos=(mode == "train"))
  key = "mask_loss" if mode == "train" else "mask_input"
  text = np.array(prompt + target, np.int32)
  mask_ar = np.array([0] * len(prompt) + [1] * len(target), np.int32)
  # Loss on exactly the target tokens; the model input is every real token.
  third = mask_ar.copy() if mode == "train" else np.ones_like(text)
  if text_len is None:
    if mode == "train":
      raise ValueError("Training needs a fixed text_len.")
    return {"text": text, "mask_ar": mask_ar, key: third}, False
  length = text_len + 1 if mode == "train" else text_len
  truncated = len(text) > length
  pad = max(0, length - len(text))
  text = np.pad(text[:length], (0, pad), constant_values=tokenizer.pad_id)
  mask_ar = np.pad(mask_ar[:length], (0, pad), constant_values=1)
  third = np.pad(third[:length], (0, pad), constant_values=0)
  return {"text": text, "mask_ar": mask_ar, key: third}, truncated

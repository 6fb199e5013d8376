"""Token-exact prompts (big_vision's layout) with the tiny tokenizer."""

import numpy as np
import pytest

from paligemma import prompt

BOS, EOS, NL = 2, 1, 4
CAPTION_EN = [486, 328]
A_RED_CIRCLE = [689, 321, 302]


def _lists(tokens):
  return {k: v.tolist() for k, v in tokens.items()}


def test_train_layout(tok):
  tokens, truncated = prompt.assemble(tok, "caption en", "a red circle", text_len=10)
  assert not truncated
  assert all(v.dtype == np.int32 and v.shape == (11,) for v in tokens.values())
  assert _lists(tokens) == {
      "text":      [BOS, 486, 328, NL, 689, 321, 302, EOS, 0, 0, 0],
      "mask_ar":   [0,   0,   0,   0,  1,   1,   1,   1,   1, 1, 1],
      "mask_loss": [0,   0,   0,   0,  1,   1,   1,   1,   0, 0, 0],
  }


def test_train_exact_fit_is_not_truncated(tok):
  tokens, truncated = prompt.assemble(tok, "caption en", "a red circle", text_len=7)
  assert not truncated
  assert tokens["text"].tolist() == [BOS, 486, 328, NL, 689, 321, 302, EOS]


def test_train_truncation_cuts_eos_then_suffix(tok):
  tokens, truncated = prompt.assemble(tok, "caption en", "a red circle", text_len=5)
  assert truncated
  assert _lists(tokens) == {"text": [BOS, 486, 328, NL, 689, 321],
                            "mask_ar": [0, 0, 0, 0, 1, 1],
                            "mask_loss": [0, 0, 0, 0, 1, 1]}
  tokens, truncated = prompt.assemble(tok, "caption en", "a red circle", text_len=1)
  assert truncated
  assert _lists(tokens) == {"text": [BOS, 486], "mask_ar": [0, 0], "mask_loss": [0, 0]}


def test_train_empty_suffix_is_eos_and_none_is_an_error(tok):
  tokens, _ = prompt.assemble(tok, "caption en", "", text_len=5)
  assert tokens["text"].tolist() == [BOS, 486, 328, NL, EOS, 0]
  assert tokens["mask_loss"].tolist() == [0, 0, 0, 0, 1, 0]
  with pytest.raises(ValueError, match="no suffix"):
    prompt.assemble(tok, "caption en", None, text_len=5)


def test_eval_layout(tok):
  tokens, truncated = prompt.assemble(tok, "caption en", text_len=6, mode="eval")
  assert not truncated
  assert _lists(tokens) == {"text": [BOS, 486, 328, NL, 0, 0],
                            "mask_ar": [0, 0, 0, 0, 1, 1],
                            "mask_input": [1, 1, 1, 1, 0, 0]}


def test_eval_forced_suffix_start_has_no_eos(tok):
  tokens, _ = prompt.assemble(tok, "caption en", "a red", text_len=7, mode="eval")
  assert _lists(tokens) == {"text": [BOS, 486, 328, NL, 689, 321, 0],
                            "mask_ar": [0, 0, 0, 0, 1, 1, 1],
                            "mask_input": [1, 1, 1, 1, 1, 1, 0]}


def test_eval_unpadded_and_truncated(tok):
  tokens, truncated = prompt.assemble(tok, "caption en", text_len=None, mode="eval")
  assert not truncated
  assert tokens["text"].tolist() == [BOS, 486, 328, NL]
  tokens, truncated = prompt.assemble(tok, "caption en", text_len=3, mode="eval")
  assert truncated
  assert _lists(tokens) == {"text": [BOS, 486, 328], "mask_ar": [0, 0, 0],
                            "mask_input": [1, 1, 1]}


def test_separator_tokenized_alone_equals_inside_prefix(tok):
  for prefix in ("caption en", "answer en what is this?", "detect circle ; square", "ocr."):
    tokens, _ = prompt.assemble(tok, prefix, text_len=None, mode="eval")
    assert tokens["text"].tolist() == tok.encode(prefix + "\n", bos=True)


def test_bad_mode(tok):
  with pytest.raises(ValueError, match="mode"):
    prompt.assemble(tok, "x", "y", text_len=4, mode="predict")

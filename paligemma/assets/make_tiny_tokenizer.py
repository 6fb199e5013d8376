"""Builds `tiny_tokenizer.model`, the small PaliGemma-layout tokenizer for tests and demos.

  python -m paligemma.assets.make_tiny_tokenizer [--output PATH]

A BPE SentencePiece model trained on `tiny_tokenizer_corpus.txt` with Gemma's settings
(pad 0, eos 1, bos 2, unk 3, byte fallback, split digits, no dummy prefix, whitespace
and "\\n" kept verbatim), then the 1024 <loc> and 128 <seg> pieces appended as
user-defined pieces, as the real tokenizer holds them after its text vocabulary.
Single-threaded and unshuffled so the same corpus gives the same model.
"""

import argparse
import io
import os

import sentencepiece as spm

from paligemma import tokenizer

HERE = os.path.dirname(__file__)
CORPUS = os.path.join(HERE, "tiny_tokenizer_corpus.txt")
TEXT_VOCAB_SIZE = 768  # Text pieces incl. specials, "\n" and 256 bytes; loc/seg come on top.


def build(corpus=CORPUS, vocab_size=TEXT_VOCAB_SIZE):
  """Serialized model proto (bytes) of the tiny tokenizer."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      input=corpus, model_writer=out, model_type="bpe", vocab_size=vocab_size,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=["\n"], byte_fallback=True, split_digits=True,
      character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", allow_whitespace_only_pieces=True,
      num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
      minloglevel=2)
  return tokenizer.add_loc_seg_pieces(out.getvalue())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=tokenizer.TINY_TOKENIZER)
  args = parser.parse_args()
  with open(args.output, "wb") as f:
    f.write(build())
  tok = tokenizer.Tokenizer(args.output)
  print(f"Wrote {args.output}: {tok.vocab_size} pieces, loc at {tok.loc_offset}, "
        f"seg at {tok.seg_offset}.")


if __name__ == "__main__":
  main()

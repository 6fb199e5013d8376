"""transformers processor files (tokenizer + image preprocessing) for an exported model."""

import os
import tempfile

from paligemma.models import variants


def _sentencepiece_path(tokenizer):
  if isinstance(tokenizer, (str, os.PathLike)):
    return os.fspath(tokenizer)
  path = getattr(tokenizer, "path", None)  # paligemma.tokenizer.Tokenizer
  if path is None:
    raise TypeError(f"save_hf(tokenizer=...): expected a SentencePiece model path, a "
                    f"paligemma Tokenizer or a transformers processor, got {type(tokenizer)}")
  return path


def save_processor(tokenizer, model_config, directory):
  """Writes PaliGemmaProcessor files whose `<image>` id is the model's image token."""
  import transformers  # pylint: disable=g-import-not-at-top
  from paligemma import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if hasattr(tokenizer, "save_pretrained"):  # Already a transformers tokenizer/processor.
    tokenizer.save_pretrained(directory)
    return
  img = variants.resolve_vit(model_config["img"])
  vocab = variants.resolve_gemma(model_config["llm"])["vocab_size"]
  path = _sentencepiece_path(tokenizer)
  with open(path, "rb") as f:
    proto = f.read()
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_proto=proto)
  if sp.piece_to_id(tokenizer_lib.loc_piece(0)) == sp.unk_id():
    # A plain Gemma model: give it the loc/seg pieces first so ids match ours.
    proto = tokenizer_lib.add_loc_seg_pieces(proto)
  # Built in a folder of its own: stale tokenizer files in `directory` must not be read.
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
      f.write(proto)
    # GemmaTokenizer would add a <mask> token at our image-token id: no mask token.
    hf_tok = transformers.GemmaTokenizer.from_pretrained(tmp, mask_token=None)
  # transformers 5 saves its init kwargs, this temporary vocab_file path among them.
  hf_tok.init_kwargs.pop("vocab_file", None)
  size = img["image_size"]
  image_processor = transformers.SiglipImageProcessor(
      size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
      resample=3, do_convert_rgb=True)  # [-1, 1] range, bicubic, as big_vision.
  image_processor.image_seq_length = (size // img["patch_size"]) ** 2
  processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf_tok)
  if processor.image_token_id != vocab:
    raise ValueError(f"save_hf: the tokenizer {path} puts <image> at id "
                     f"{processor.image_token_id}, but the model's image token is {vocab} "
                     f"(its vocab_size); use the tokenizer the model was trained with")
  processor.save_pretrained(directory)
  # The SentencePiece model too, as on the Hub: predict and convert find it there.
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(proto)

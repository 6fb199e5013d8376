"""Tokenizer layout, exact ids of the tiny tokenizer, loc/seg handling and box strings."""

import io

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from paligemma import tokenizer
from paligemma.assets import make_tiny_tokenizer

# Ids of the committed tiny tokenizer, read off once and written out by hand: a rebuilt
# or edited model that changes them must fail here.
TEXT_VOCAB = 768
CAPTION_EN = [486, 328]           # "caption", "▁en"
NEWLINE = 4
A_RED_CIRCLE = [689, 321, 302]    # "a", "▁red", "▁circle"


def _text_only_model(tmp_path):
  """The tiny model without its loc/seg pieces: the shape of a plain Gemma tokenizer."""
  proto = sentencepiece_model_pb2.ModelProto()
  with open(tokenizer.TINY_TOKENIZER, "rb") as f:
    proto.ParseFromString(f.read())
  del proto.pieces[TEXT_VOCAB:]
  path = tmp_path / "gemma_like.model"
  path.write_bytes(proto.SerializeToString())
  return path


def test_special_ids_and_loc_seg_layout(tok):
  assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == TEXT_VOCAB + 1024 + 128
  assert (tok.loc_offset, tok.seg_offset) == (768, 1792)
  assert tok.id_to_piece(768) == "<loc0000>" and tok.id_to_piece(1791) == "<loc1023>"
  assert tok.id_to_piece(1792) == "<seg000>" and tok.id_to_piece(1919) == "<seg127>"
  assert tok.loc_id(5) == 773 and tok.seg_id(127) == 1919
  assert tok.newline_id == NEWLINE and tok.id_to_piece(NEWLINE) == "\n"


def test_exact_ids(tok):
  assert tok.encode("caption en") == CAPTION_EN
  assert tok.encode("caption en", bos=True, eos=True) == [2] + CAPTION_EN + [1]
  assert tok.encode("a red circle") == A_RED_CIRCLE
  assert tok.encode("\n") == [NEWLINE]
  # "\n" survives normalisation and is its own piece, also inside text.
  assert tok.encode("caption en\n") == CAPTION_EN + [NEWLINE]
  # loc/seg strings are single tokens wherever they appear.
  assert tok.encode("<loc0001><loc1023> circle<seg005>") == [769, 1791, 302, 1797]


def test_unknown_characters_fall_back_to_bytes_and_round_trip(tok):
  text = "é 🙂  two  spaces\n\nend"
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_drops_pad_bos(tok):
  assert tok.decode([2] + A_RED_CIRCLE + [1, 689, 0]) == "a red circle"
  assert tok.decode(np.array([[2, 769, 1791, 302, 0, 0]])) == "<loc0001><loc1023> circle"


def test_plain_gemma_style_model_gets_loc_seg_appended(tmp_path, tok):
  plain = tokenizer.Tokenizer(_text_only_model(tmp_path))
  assert plain.vocab_size == tok.vocab_size
  assert (plain.loc_offset, plain.seg_offset) == (TEXT_VOCAB, TEXT_VOCAB + 1024)
  text = "detect circle ; square <loc0000><loc0512><loc1023><loc0256> circle"
  assert plain.encode(text) == tok.encode(text)
  # The in-memory model (what exporters write) holds the appended pieces.
  assert spm.SentencePieceProcessor(model_proto=plain.model_proto).piece_to_id("<seg127>") == 1919


def test_partial_loc_set_is_refused(tmp_path):
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(_text_only_model(tmp_path).read_bytes())
  proto.pieces.add(piece="<loc0000>", score=0.0, type=proto.SentencePiece.USER_DEFINED)
  path = tmp_path / "partial.model"
  path.write_bytes(proto.SerializeToString())
  with pytest.raises(ValueError, match="<loc> pieces are missing or not contiguous"):
    tokenizer.Tokenizer(path)


def test_wrong_special_ids_are_refused(tmp_path):
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(  # SentencePiece's defaults: unk 0, bos 1, eos 2.
      input=make_tiny_tokenizer.CORPUS, model_writer=out, vocab_size=300,
      user_defined_symbols=["\n"], minloglevel=2)
  path = tmp_path / "default_ids.model"
  path.write_bytes(out.getvalue())
  with pytest.raises(ValueError, match="pad 0, eos 1, bos 2, unk 3"):
    tokenizer.Tokenizer(path)


def test_missing_model_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer.Tokenizer(tmp_path / "nope.model")


def test_build_script_reproduces_committed_model(tmp_path):
  # SentencePiece's trainer is not always byte-reproducible (seen once in CI), so compare
  # what matters: the special layout, the loc/seg block, and (nearly) the same pieces.
  rebuilt_path = tmp_path / "rebuilt.model"
  rebuilt_path.write_bytes(make_tiny_tokenizer.build())
  committed, rebuilt = tokenizer.Tokenizer(tokenizer.TINY_TOKENIZER), tokenizer.Tokenizer(rebuilt_path)
  assert rebuilt.vocab_size == committed.vocab_size
  assert (rebuilt.loc_offset, rebuilt.seg_offset, rebuilt.newline_id) == (
      committed.loc_offset, committed.seg_offset, committed.newline_id)
  pieces = lambda t: {t.id_to_piece(i) for i in range(t.vocab_size)}
  assert len(pieces(rebuilt) & pieces(committed)) >= 0.95 * committed.vocab_size


def test_box_to_loc_binning_and_order():
  # round(v * 1023): 0.5 -> 511.5 -> 512 (half to even), 0.25 -> 255.75 -> 256.
  assert tokenizer.box_to_loc([0.0, 0.5, 1.0, 0.25]) == "<loc0000><loc0512><loc1023><loc0256>"
  assert tokenizer.box_to_loc([-0.2, 0.1, 1.7, 0.999]) == "<loc0000><loc0102><loc1023><loc1022>"
  with pytest.raises(ValueError, match="y_min, x_min, y_max, x_max"):
    tokenizer.box_to_loc([0.1, 0.2, 0.3])


def test_loc_round_trip_within_half_a_bin():
  boxes = np.random.default_rng(0).uniform(size=(50, 4))
  for box in boxes:
    back = tokenizer.loc_to_box(tokenizer.box_to_loc(box))
    assert np.all(np.abs(back - box) <= 0.5 / 1023 + 1e-12)
  np.testing.assert_allclose(tokenizer.loc_to_box("<loc0000><loc1023><loc0512><loc0001>"),
                             [0.0, 1.0, 512 / 1023, 1 / 1023])


def test_detection_string_and_parse():
  s = tokenizer.detection_string([[0, 0, 0.5, 0.5], [0.5, 0.25, 1, 1]], ["cat", "red dog"])
  assert s == ("<loc0000><loc0000><loc0512><loc0512> cat ; "
               "<loc0512><loc0256><loc1023><loc1023> red dog")
  parsed, malformed = tokenizer.parse_detections(s + " ; <loc0001> broken")
  assert [label for label, _ in parsed] == ["cat", "red dog"] and malformed == 1
  np.testing.assert_allclose(parsed[1][1], [512 / 1023, 256 / 1023, 1, 1])

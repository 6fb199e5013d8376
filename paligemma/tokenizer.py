"""SentencePiece tokenizer with the PaliGemma layout, and box <-> `<locNNNN>` strings.

Layout: pad 0, eos 1, bos 2, unk 3; then the text
pieces; then 1024 `<loc0000>`..`<loc1023>` and 128 `<seg000>`..`<seg127>` pieces, each
set contiguous. The released `paligemma_tokenizer.model` already holds them at
256000.. and 257024..; a plain Gemma tokenizer (256000 pieces) gets them appended at
load time, which yields the same ids. The tiny tokenizer for tests and demos
(`TINY_TOKENIZER`, built by `paligemma/assets/make_tiny_tokenizer.py`) has the same
layout with a small text vocabulary.

Boxes: coordinates normalised to [0, 1], binned as `round(v * 1023)` clipped to
0..1023 (big_vision's factor; community converters use 1024, which shifts boxes by up to
one bin), written in the order y_min, x_min, y_max, x_max. `loc_to_box` decodes with the
same factor, so a round trip is exact to within half a bin.

Detection strings: objects joined by " ; ", each four `<locNNNN>` tokens and a label
(`detection_string` writes them, `parse_detections` reads them back; the one format
used by the data sources, the evaluators and `predict`). Segmentation strings put 16
`<segNNN>` tokens between the boxes and the labels; `parse_objects` reads both kinds.
"""

import os
import re

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
NUM_LOC, NUM_SEG = 1024, 128
LOC_FACTOR = NUM_LOC - 1  # round(v * 1023): 0 -> <loc0000>, 1 -> <loc1023>.
TINY_TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tiny_tokenizer.model")

_SPECIALS = {PAD_ID: "pad", EOS_ID: "eos", BOS_ID: "bos", UNK_ID: "unk"}
_LOC_RE = re.compile(r"<loc(\d{4})>")
_SEG_RE = re.compile(r"<seg(\d{3})>")
# Four loc tokens, optionally 16 seg tokens (no spaces between tokens), then the label.
_OBJECT_RE = re.compile(r"^\s*((?:<loc\d{4}>){4})((?:<seg\d{3}>){16})?\s*([^<>;]*?)\s*$")


def loc_piece(i):
  return f"<loc{i:04d}>"


def seg_piece(i):
  return f"<seg{i:03d}>"


def add_loc_seg_pieces(model_proto):
  """Returns a serialized SentencePiece model with the 1152 loc/seg pieces appended."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  existing = {p.piece for p in proto.pieces}
  new = [loc_piece(i) for i in range(NUM_LOC)] + [seg_piece(i) for i in range(NUM_SEG)]
  clash = sorted(existing.intersection(new))
  if clash:
    raise ValueError(f"Tokenizer already holds some but not all loc/seg pieces ({clash[:3]}...); "
                     "use a model with all 1152 of them or none.")
  for piece in new:
    # USER_DEFINED pieces are matched verbatim before the text model runs, so
    # "<loc0042>" is always one token whatever surrounds it.
    proto.pieces.add(piece=piece, score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  return proto.SerializeToString()


class Tokenizer:
  """A SentencePiece model with pad 0, eos 1, bos 2, unk 3 and contiguous loc/seg pieces."""

  pad_id, eos_id, bos_id, unk_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID

  def __init__(self, path=TINY_TOKENIZER):
    self.path = str(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(
          f"Tokenizer model {self.path!r} not found. Pass the `paligemma_tokenizer.model` "
          f"from the checkpoint, a Gemma `tokenizer.model`, or TINY_TOKENIZER.")
    with open(self.path, "rb") as f:
      proto = f.read()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    if sp.piece_to_id(loc_piece(0)) == sp.unk_id():
      proto = add_loc_seg_pieces(proto)
      sp = spm.SentencePieceProcessor(model_proto=proto)
    self._sp = sp
    self.model_proto = proto  # Serialized, loc/seg included: what exporters should write.
    self._check_layout()
    self.loc_offset = sp.piece_to_id(loc_piece(0))
    self.seg_offset = sp.piece_to_id(seg_piece(0))
    self.newline_id = sp.piece_to_id("\n")

  def _check_layout(self):
    sp = self._sp
    actual = {"pad": sp.pad_id(), "eos": sp.eos_id(), "bos": sp.bos_id(), "unk": sp.unk_id()}
    for want_id, name in _SPECIALS.items():
      if actual[name] != want_id:
        raise ValueError(f"Tokenizer {self.path!r}: {name} id is {actual[name]}, PaliGemma needs "
                         f"pad 0, eos 1, bos 2, unk 3 (got {actual}); use a Gemma-family model.")
    for make, count, kind in ((loc_piece, NUM_LOC, "loc"), (seg_piece, NUM_SEG, "seg")):
      first = sp.piece_to_id(make(0))
      ids = [sp.piece_to_id(make(i)) for i in range(count)]
      if ids != list(range(first, first + count)):
        raise ValueError(f"Tokenizer {self.path!r}: the {count} <{kind}> pieces are missing or not "
                         "contiguous; use a model with all of them in order, or with none.")
    if sp.piece_to_id("\n") == sp.unk_id():
      raise ValueError(f"Tokenizer {self.path!r} has no '\\n' piece, the prompt separator.")

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  def encode(self, text, *, bos=False, eos=False):
    """Token ids of `text` (list[int]), optionally with bos first / eos last."""
    ids = self._sp.encode(text)
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

  def decode(self, ids):
    """Text of ids: stops at the first eos, drops pad and bos."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i not in (PAD_ID, BOS_ID):
        out.append(i)
    return self._sp.decode(out)

  def id_to_piece(self, i):
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece):
    return self._sp.piece_to_id(piece)

  def loc_id(self, i):
    return self.loc_offset + int(i)

  def seg_id(self, i):
    return self.seg_offset + int(i)


def load_tokenizer(path=None):
  """Tokenizer from a `.model` file; None gives the tiny test tokenizer."""
  return Tokenizer(TINY_TOKENIZER if path is None else path)


def box_to_loc(box):
  """`<locY1><locX1><locY2><locX2>` of a box (y_min, x_min, y_max, x_max) in [0, 1]."""
  box = np.asarray(box, np.float64)
  if box.shape != (4,):
    raise ValueError(f"A box is (y_min, x_min, y_max, x_max), got shape {box.shape}.")
  bins = np.clip(np.round(box * LOC_FACTOR), 0, LOC_FACTOR).astype(int)
  return "".join(loc_piece(b) for b in bins)


def loc_to_box(loc_string):
  """float64[4] (y_min, x_min, y_max, x_max) in [0, 1] from four `<locNNNN>` pieces."""
  bins = [int(m) for m in _LOC_RE.findall(loc_string)]
  if len(bins) != 4:
    raise ValueError(f"Expected four <locNNNN> pieces, got {len(bins)} in {loc_string!r}.")
  return np.minimum(np.array(bins, np.float64), LOC_FACTOR) / LOC_FACTOR


def detection_string(boxes, labels):
  """`<loc..>x4 label ; <loc..>x4 label` for boxes float[N, 4] (y1, x1, y2, x2) in [0, 1]."""
  if len(boxes) != len(labels):
    raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels.")
  return " ; ".join(f"{box_to_loc(b)} {label}" for b, label in zip(boxes, labels))


def parse_objects(text, *, segments=False):
  """([(label, int loc bins[4], int seg codes[16] or None)], number malformed) of a
  detection (segments=False) or segmentation (segments=True) string.

  Objects are joined by " ; ". Detection objects need a label and no seg tokens;
  segmentation objects need exactly 16 seg tokens right after the loc tokens, and may
  have an empty label (RefCOCO answers have none). Malformed objects (missing or extra
  tokens, text around them, loc bins beyond 1023, an empty or inverted box) are
  counted and left out, never fatal: model outputs are parsed with this."""
  objects, malformed = [], 0
  for part in text.split(";"):
    if not part.strip():
      continue
    match = _OBJECT_RE.match(part)
    label = match.group(3) if match else ""
    if not match or bool(match.group(2)) != segments or not (label or segments):
      malformed += 1
      continue
    bins = [int(b) for b in _LOC_RE.findall(match.group(1))]
    if max(bins) > LOC_FACTOR or bins[2] <= bins[0] or bins[3] <= bins[1]:
      malformed += 1
      continue
    codes = [int(c) for c in _SEG_RE.findall(match.group(2))] if segments else None
    if codes and max(codes) >= NUM_SEG:
      malformed += 1
      continue
    objects.append((label, bins, codes))
  return objects, malformed


def parse_detections(text):
  """([(label, float64[4] box in [0, 1])], number of malformed objects) of a detection
  string (see `parse_objects`)."""
  objects, malformed = parse_objects(text)
  return [(label, np.array(bins, np.float64) / LOC_FACTOR) for label, bins, _ in objects], malformed

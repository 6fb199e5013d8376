"""The tf.data pipeline: batch layout, order, sharding, resume and bad data."""

import itertools
import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from paligemma.data import pipeline  # pylint: disable=g-import-not-at-top

BOS, EOS, NL = 2, 1, 4
CAPTION_EN = [486, 328]
A_RED_CIRCLE = [689, 321, 302]
N = 10


def _write_jsonl(folder, n=N, bad=()):
  """n solid-colour PNGs whose red channel encodes the example number (25 * i)."""
  lines = []
  for i in range(n):
    name = f"{i}.png"
    if i not in bad:
      Image.new("RGB", (16, 12), (25 * i, 255, 0)).save(os.path.join(folder, name))
    lines.append({"image": name, "prefix": "caption en", "suffix": "a red circle",
                  "id": f"ex{i}", "references": ["a red circle", f"ref {i}"]})
  path = os.path.join(folder, "data.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps(l) + "\n" for l in lines))
  return {"name": "jsonl", "path": path}


@pytest.fixture
def jsonl(tmp_path):
  return _write_jsonl(str(tmp_path))


def _numbers(batch):
  """Example numbers of a batch, read back from the red channel."""
  red = (batch["image"][:, 0, 0, 0] + 1) * 127.5
  return np.round(red / 25).astype(int).tolist()


def _train(source, tok, **kw):
  kw = {"image_size": 8, "text_len": 8, "batch_size": 2, "seed": 0, "process_index": 0,
        "process_count": 1, **kw}
  return pipeline.make_train_input(source, tok, **kw)


def _eval(source, tok, **kw):
  kw = {"image_size": 8, "text_len": 6, "batch_size": 4, "process_index": 0,
        "process_count": 1, **kw}
  return pipeline.make_eval_input(source, tok, **kw)


def _stream(inp, batches):
  it = iter(inp)
  return [n for _ in range(batches) for n in _numbers(next(it))]


def test_train_batch_layout_and_exact_tokens(jsonl, tok):
  batch = next(iter(_train(jsonl, tok, batch_size=4, image_size=(8, 6))))
  assert sorted(batch) == sorted(pipeline.TRAIN_KEYS)
  assert batch["position"].tolist() == [0, 1, 2, 3] and not batch["truncated"].any()
  assert batch["image"].shape == (4, 8, 6, 3) and batch["image"].dtype == np.float32
  # 255 -> 1, or 254 -> 1 - 2/255 where the antialiased resize of the flat 255 lands a
  # hair under 255 and (as in big_vision) the cast back to uint8 truncates.
  assert np.isin(batch["image"][..., 1], [1.0, np.float32(254 / 255 * 2 - 1)]).all()
  assert batch["text"].dtype == np.int32 and batch["text"].shape == (4, 9)
  row = [BOS, *CAPTION_EN, NL, *A_RED_CIRCLE, EOS, 0]
  assert batch["text"].tolist() == [row] * 4
  assert batch["mask_ar"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]] * 4
  assert batch["mask_loss"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0]] * 4


def test_value_range_and_resize_of_real_pixels(tmp_path, tok):
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, 20:] = 255
  Image.fromarray(pixels).save(tmp_path / "half.png")
  (tmp_path / "d.jsonl").write_text(json.dumps({"image": "half.png", "prefix": "p",
                                                "suffix": "s"}) + "\n")
  batch = next(iter(_eval({"name": "jsonl", "path": str(tmp_path / "d.jsonl")}, tok,
                          image_size=4, batch_size=1)))
  # Antialiased bilinear 40 -> 4 columns is a triangle filter 10 pixels wide each side:
  # column 1 (centre 15) gives the 5 white pixels 20..24 weights .45+.35+.25+.15+.05 of
  # 10, i.e. 0.125 white: 31.875, truncated to 31 as big_vision's resize casts back to
  # uint8 (column 2: 223.125 -> 223). Without antialias it would read 0.
  levels = np.array([0, 31, 223, 255], np.float32)
  np.testing.assert_allclose(batch["image"][0, :, :, 0], [levels / 127.5 - 1] * 4,
                             atol=1e-6)
  plain = next(iter(_eval({"name": "jsonl", "path": str(tmp_path / "d.jsonl")}, tok,
                          image_size=4, batch_size=1, antialias=False)))
  np.testing.assert_allclose(plain["image"][0, :, :, 0], [[-1, -1, 1, 1]] * 4, atol=1e-5)


def test_epochs_are_permutations_and_seeded(jsonl, tok):
  two_epochs = _stream(_train(jsonl, tok, num_epochs=2), 2 * N // 2)
  assert sorted(two_epochs[:N]) == list(range(N)) == sorted(two_epochs[N:])
  assert two_epochs[:N] != two_epochs[N:]
  expected = np.random.default_rng([0, 0]).permutation(N).tolist()
  assert two_epochs[:N] == expected
  assert _stream(_train(jsonl, tok, num_epochs=2), N) == two_epochs  # Deterministic.
  assert _stream(_train(jsonl, tok, seed=1), N // 2) != two_epochs[:N]
  assert len(list(_train(jsonl, tok, num_epochs=1, batch_size=4))) == 2  # 10 // 4, drop rest.


def test_resume_at_step_continues_the_stream(jsonl, tok):
  full = _stream(_train(jsonl, tok, batch_size=4), 8)  # 3.2 epochs.
  for step in (1, 2, 3, 5):
    assert _stream(_train(jsonl, tok, batch_size=4, start_step=step), 8 - step) == full[4 * step:]


def test_two_processes_read_disjoint_shards(jsonl, tok):
  shards = [_stream(_train(jsonl, tok, batch_size=4, process_index=p, process_count=2), N // 2)
            for p in (0, 1)]
  # Each process gets N // 2 = 5 examples an epoch; local batches of 2 span epochs.
  first0, first1 = shards[0][:5], shards[1][:5]
  assert not set(first0) & set(first1)
  assert sorted(first0 + first1) == list(range(N))
  perm = np.random.default_rng([0, 0]).permutation(N).tolist()
  assert first0 == perm[0::2] and first1 == perm[1::2]


def test_train_indices_shards_cover_every_epoch():
  for n, count in ((11, 3), (8, 2), (5, 5)):
    per = n // count
    streams = [list(pipeline.train_indices(n, 7, p, count, num_epochs=3)) for p in range(count)]
    for epoch in range(3):
      parts = [s[epoch * per:(epoch + 1) * per] for s in streams]
      seen = [i for part in parts for i in part]
      assert len(seen) == len(set(seen)) == per * count
  assert list(pipeline.train_indices(6, 0, 0, 1, start=8, num_epochs=2)) == \
      np.random.default_rng([0, 1]).permutation(6).tolist()[2:]
  with pytest.raises(ValueError, match="cannot be shared"):
    list(pipeline.train_indices(1, 0, 0, 2))


def test_eval_every_example_once_with_padding(jsonl, tok):
  inp = _eval(jsonl, tok)
  batches = list(inp)
  assert inp.steps_per_epoch == len(batches) == 3
  last = batches[-1]
  assert sorted(last) == sorted(pipeline.EVAL_KEYS)
  assert last["valid"].tolist() == [True, True, False, False]
  assert last["index"].tolist() == [8, 9, -1, -1]
  assert last["id"] == ["ex8", "ex9", "", ""]
  assert last["prefix"] == ["caption en", "caption en", "", ""]
  assert last["references"] == [["a red circle", "ref 8"], ["a red circle", "ref 9"], [], []]
  assert last["text"].tolist() == [[BOS, *CAPTION_EN, NL, 0, 0]] * 2 + [[BOS, NL, 0, 0, 0, 0]] * 2
  assert last["mask_ar"].tolist() == [[0, 0, 0, 0, 1, 1]] * 2 + [[0, 0, 1, 1, 1, 1]] * 2
  assert last["mask_input"].tolist() == [[1, 1, 1, 1, 0, 0]] * 2 + [[1, 1, 0, 0, 0, 0]] * 2
  numbers = [n for b in batches for n, v in zip(_numbers(b), b["valid"]) if v]
  assert numbers == list(range(N))


def test_eval_two_processes_same_batch_count_disjoint(jsonl, tok):
  per = [list(_eval(jsonl, tok, batch_size=4, process_index=p, process_count=2))
         for p in (0, 1)]
  assert len(per[0]) == len(per[1]) == 3  # 5 examples each, local batch 2.
  seen = [[i for b in batches for i, v in zip(b["index"], b["valid"]) if v] for batches in per]
  assert seen == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


def test_truncation_is_counted_once_per_example(jsonl, tok):
  inp = _train(jsonl, tok, text_len=5, num_epochs=2)
  batches = list(inp)
  assert batches[0]["text"][0].tolist() == [BOS, *CAPTION_EN, NL, *A_RED_CIRCLE[:2]]
  assert inp.stats.num_truncated == N
  ev = _eval(jsonl, tok, text_len=6)
  list(ev)
  assert ev.stats.num_truncated == 0


def test_bad_images_skipped_counted_and_named(tmp_path, tok, caplog):
  source = _write_jsonl(str(tmp_path), bad=(3, 6))
  (tmp_path / "6.png").write_text("not a png")  # 3 is missing, 6 is a text file.
  inp = _train(source, tok, num_epochs=1, batch_size=4)
  with caplog.at_level(logging.WARNING):
    numbers = [n for b in inp for n in _numbers(b)]
  assert sorted(numbers) == [0, 1, 2, 4, 5, 7, 8, 9]  # 8 good images: two full batches.
  assert inp.stats.num_skipped == 2 and set(inp.stats.skipped) == {"ex3", "ex6"}
  assert "3.png not found" in inp.stats.skipped["ex3"]
  assert "3.png" in caplog.text and "6.png" in caplog.text
  ev = _eval(source, tok)
  valid = {i: v for b in ev for i, v in zip(b["index"], b["valid"]) if i >= 0}
  assert [i for i, v in valid.items() if not v] == [3, 6] and len(valid) == N
  assert ev.stats.num_skipped == 2
  with pytest.raises(Exception, match=r"ImageError: Image .*[36]\.png"):
    list(_train(source, tok, num_epochs=1, on_bad_image="raise"))


def test_positions_resume_exactly_past_skipped_images(tmp_path, tok):
  """Each batch says where the stream is; resuming there (not at step * B) continues the
  stream exactly even though skipped images took places in it."""
  source = _write_jsonl(str(tmp_path), bad=(3, 6))
  full = list(itertools.islice(_train(source, tok, batch_size=2), 9))
  trained = [n for b in full for n in _numbers(b)]
  assert 3 not in trained and 6 not in trained
  for step in (1, 3, 4, 7):
    position = int(full[step - 1]["position"][-1]) + 1
    resumed = list(itertools.islice(_train(source, tok, batch_size=2,
                                           start_position=position), 9 - step))
    assert [n for b in resumed for n in _numbers(b)] == trained[2 * step:], step
    for a, b in zip(resumed, full[step:]):
      np.testing.assert_array_equal(a["position"], b["position"])
  # Positions count the skipped examples: the gaps are exactly the bad images.
  positions = np.concatenate([b["position"] for b in full])
  stream = list(itertools.islice(pipeline.train_indices(N, 0, 0, 1), positions[-1] + 1))
  gaps = sorted(set(range(positions[-1] + 1)) - set(positions.tolist()))
  assert [stream[g] for g in gaps] and all(stream[g] in (3, 6) for g in gaps)
  assert [stream[p] for p in positions] == trained


def test_truncated_flag_marks_cut_examples(tmp_path, tok):
  lines = [{"image": "0.png", "prefix": "caption en", "suffix": "a red circle", "id": "short"},
           {"image": "0.png", "prefix": "caption en", "suffix": "a red circle and a blue "
            "square and a green triangle", "id": "long"}]
  Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
  (tmp_path / "d.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  batch = next(iter(_train({"name": "jsonl", "path": str(tmp_path / "d.jsonl")}, tok,
                           text_len=8, num_epochs=1)))
  order = np.random.default_rng([0, 0]).permutation(2).tolist()
  assert batch["truncated"].tolist() == [lines[i]["id"] == "long" for i in order]


def test_eval_prompt_longer_than_text_len_raises_naming_it(jsonl, tok):
  # "caption en" + separator is 4 tokens; at text_len 3 the separator would be lost.
  with pytest.raises(Exception, match=r"example 'ex0'.*does not fit text_len=3"):
    list(_eval(jsonl, tok, text_len=3))


def test_all_images_bad_raises_instead_of_looping(tmp_path, tok):
  source = _write_jsonl(str(tmp_path), n=3, bad=(0, 1, 2))
  with pytest.raises(Exception, match="Every image of .* is unreadable"):
    next(iter(_train(source, tok)))


def test_shapes_source_and_argument_checks(tok):
  shapes = {"name": "shapes", "num_examples": 6, "image_size": 24, "seed": 1}
  batch = next(iter(_train(shapes, tok, image_size=16, text_len=10, batch_size=3)))
  assert batch["image"].shape == (3, 16, 16, 3)
  assert -1.0 <= batch["image"].min() < 0 and batch["image"].max() == 1.0
  assert all(tok.decode(t).startswith("caption en\na ") for t in batch["text"])
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    _train(shapes, tok, batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="not in range"):
    _train(shapes, tok, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="on_bad_image"):
    _train(shapes, tok, on_bad_image="ignore")
  with pytest.raises(ValueError, match="Unknown data source name"):
    _train({"name": "coco"}, tok)

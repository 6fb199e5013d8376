"""Captioning metrics with the standard COCO caption scorers (pycocoevalcap).

Each prediction is scored against all references of its image: CIDEr (CIDEr-D as in
the COCO server), BLEU-4, ROUGE-L, and METEOR where Java is present. Captions are first
tokenized as the COCO server does, with Stanford's PTBTokenizer (lower-cased,
punctuation dropped); it runs on Java. Without Java (`tokenization="auto"` falls back,
"simple" forces it) a pure-Python tokenizer stands in: lower-case, words and
punctuation split by a regular expression, the same punctuation dropped. It agrees with
PTB on plain captions but not on every contraction or hyphenation, so scores may differ
slightly from the official ones; the metrics say which was used (`ptb_tokenizer` 1/0).

CIDEr's document frequencies come from the evaluated set itself, so it needs more than
one image to mean anything (with one image every n-gram has idf 0 and CIDEr is 0).

Config keys (besides the common ones): tokenization ("auto" | "ptb" | "simple"),
meteor ("auto": when Java is present | True | False).
Metrics: cider, bleu1..bleu4, rouge_l, meteor (when run), exact_match, ptb_tokenizer.
"""

import contextlib
import io
import os
import re
import shutil

from paligemma.evaluators import base
from paligemma.evaluators import exact_match as exact_match_lib

# PTBTokenizer's tokens that pycocoevalcap drops after tokenizing.
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                ":", "-", "--", "...", ";"}
# PTB splits clitics ("man 's", "do n't") and spells brackets -lrb- etc.
_TOKEN_RE = re.compile(r"\.\.\.|--|\w+(?=n't\b)|n't\b|'\w+|\w+|[^\w\s]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def java_available():
  return shutil.which("java") is not None


def simple_tokenize(text):
  """Pure-Python stand-in for PTBTokenizer + pycocoevalcap's punctuation removal."""
  tokens = (_BRACKETS.get(t, t) for t in _TOKEN_RE.findall(text.lower()))
  return " ".join(t for t in tokens if t not in _PUNCTUATION)


@contextlib.contextmanager
def _silence_stderr_fd():
  """Java's PTBTokenizer reports on file descriptor 2; keep it off the progress bar."""
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def tokenize(captions, use_ptb):
  """{key: [str]} -> {key: [tokenized str]}, with PTBTokenizer (Java) or the stand-in."""
  if use_ptb:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top
    wrapped = {k: [{"caption": c} for c in v] for k, v in captions.items()}
    with contextlib.redirect_stdout(io.StringIO()), _silence_stderr_fd():
      return PTBTokenizer().tokenize(wrapped)
  return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def caption_metrics(predictions, references, *, tokenization="auto", meteor="auto"):
  """dict[str, float] for predictions {key: str} against references {key: [str]}."""
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  if tokenization not in ("auto", "ptb", "simple"):
    raise ValueError(f"caption evaluator: tokenization must be auto, ptb or simple, got "
                     f"{tokenization!r}.")
  java = java_available()
  if tokenization == "ptb" and not java:
    raise RuntimeError("caption evaluator: tokenization='ptb' needs Java (`java` on PATH); "
                       "install a JRE or set tokenization='simple'.")
  use_ptb = java and tokenization != "simple"
  keys = list(predictions)
  missing = [k for k in keys if not references.get(k)]
  if missing:
    raise ValueError(f"caption evaluator: example(s) {missing[:3]} have no reference captions; "
                     "the data source must give `references` (or a `suffix`).")
  gts = tokenize({k: list(references[k]) for k in keys}, use_ptb)
  res = tokenize({k: [predictions[k]] for k in keys}, use_ptb)
  out = {"ptb_tokenizer": float(use_ptb)}
  with contextlib.redirect_stdout(io.StringIO()):  # The scorers print their internals.
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)})
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if meteor is True or (meteor == "auto" and java):
      from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
      scorer = Meteor()
      try:
        out["meteor"] = float(scorer.compute_score(gts, res)[0])
      finally:
        close = getattr(scorer, "close", None)
        if close:
          close()
        else:
          scorer.meteor_p.kill()
          scorer.meteor_p.wait()
  return out


class CaptionEvaluator(base.DecodingEvaluator):
  """Metrics: cider, bleu1..4, rouge_l, meteor (Java), exact_match."""
  KEYS = base.DECODE_KEYS + ("tokenization", "meteor")
  DEFAULTS = dict(base.DecodingEvaluator.DEFAULTS, tokenization="auto", meteor="auto")

  def score(self, preds):
    predictions = {str(p["index"]): p["prediction"] for p in preds}
    references = {str(p["index"]): p["references"] for p in preds}
    out = caption_metrics(predictions, references, tokenization=self.config["tokenization"],
                          meteor=self.config["meteor"])
    hits = [exact_match_lib.exact_match(p["prediction"], p["references"]) for p in preds]
    out["exact_match"] = sum(hits) / len(hits)
    return out

"""Exact match: the fraction of predictions equal to one of their references.

Both sides are compared after collapsing whitespace (case and punctuation count). The
shapes demo reports it for captions: "a red circle" must come out exactly.
"""

from paligemma.evaluators import base


def normalise(text):
  return " ".join(text.split())


def exact_match(prediction, references):
  """1.0 if `prediction` equals any reference (whitespace-normalised), else 0.0."""
  return float(normalise(prediction) in {normalise(r) for r in references})


class ExactMatchEvaluator(base.DecodingEvaluator):
  """Metrics: exact_match."""

  def score(self, preds):
    hits = [exact_match(p["prediction"], p["references"]) for p in preds]
    return {"exact_match": sum(hits) / len(hits)}

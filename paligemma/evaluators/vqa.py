"""VQAv2 accuracy with the official answer normalisation and averaging.

As the official evaluation (GT-Vision-Lab/VQA, vqaEval.py): the prediction is cleaned
(newlines, tabs, surrounding spaces), punctuation-processed, then lower-cased with
number words to digits, articles dropped and contractions restored. The human answers
are punctuation-processed only when they are not unanimous. Accuracy of a question =
the mean, over each of its human answers left out in turn, of
min(#other humans that gave the prediction / 3, 1); the score is the mean over
questions. With a single reference (custom data) leave-one-out would always give 0, so
such questions score 1 on an exact (normalised) match instead.

Metrics: accuracy (in [0, 1]).
"""

import re

from paligemma.evaluators import base

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
# The official regular expressions, typos and all ("(?!<=\d)" is a lookahead).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings -> the official form.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}


def _clean(text):
  return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text):
  """The official punctuation step: drop or space out punctuation, strip lone periods."""
  out = text
  glued = _COMMA_STRIP.search(text) is not None
  for p in _PUNCT:
    # Punctuation next to a space (or any "1,000"-style number) disappears; inside a
    # word it becomes a space ("black-and-white" -> "black and white").
    if (p + " " in text or " " + p in text) or glued:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def process_digit_article(text):
  """The official word step: lower-case, number words -> digits, no articles, contractions."""
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalise_answer(answer):
  """A prediction as the official evaluation compares it."""
  return process_digit_article(process_punctuation(_clean(answer)))


def vqa_accuracy(prediction, answers):
  """Accuracy in [0, 1] of one prediction against the human answers (list[str])."""
  pred = normalise_answer(prediction)
  answers = [_clean(a) for a in answers]
  if len(set(answers)) > 1:
    answers = [process_punctuation(a) for a in answers]
  if len(answers) == 1:
    return float(pred == normalise_answer(answers[0]))
  accs = []
  for i in range(len(answers)):
    others = answers[:i] + answers[i + 1:]
    accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
  return sum(accs) / len(accs)


class VqaEvaluator(base.DecodingEvaluator):
  """Metrics: accuracy (VQAv2 official). References: all human answers of a question."""

  def score(self, preds):
    accs = [vqa_accuracy(p["prediction"], p["references"]) if p["references"] else 0.0
            for p in preds]
    return {"accuracy": sum(accs) / len(accs)}

"""Rule tables: which row of a config table a parameter name falls in.

Two config keys assign each parameter, by its "/"-joined name
("llm/layers/attn/q_einsum/w"), a value from a table of (regex, value) rows:
`schedule` (its group: trained with a schedule, or frozen; paligemma/optim.py) and
`sharding_strategy` (where it lives; paligemma/sharding.py). Both read the table the
same way, here:

  - a table is a preset name (a key of the caller's presets) or a list of
    (regex, value) pairs;
  - the first row whose regex matches the WHOLE name wins (`re.fullmatch`): "llm/.*"
    matches "llm/embedder/input_embedding", "llm" and "attn" match no parameter;
  - a name no row matches is an error naming it (a table that wants a default ends with
    a catch-all row, (".*", value)).
"""

import re


def table(rows, presets, key, row_kind="(regex, value)"):
  """[(compiled regex, value)] of a preset name or a list of (regex, value) pairs.

  key: the config key, for errors ("config.schedule"); row_kind: how its rows read.
  """
  if isinstance(rows, str):
    if rows not in presets:
      raise ValueError(f"{key} {rows!r} is not a preset; use one of {list(presets)} or a "
                       f"list of {row_kind} pairs.")
    rows = presets[rows]
  out = []
  for row in rows:
    if isinstance(row, str) or len(row) != 2:
      raise ValueError(f"{key} entry {row!r} must be a {row_kind} pair.")
    pattern, value = row
    try:
      out.append((re.compile(pattern), value))
    except re.error as e:
      raise ValueError(f"{key} regex {pattern!r} is invalid: {e}") from None
  return out


def first_match(rows, name, key, hint=""):
  """Index in `rows` ([(compiled regex, value)]) of the first regex matching all of `name`;
  raises ValueError naming `name` (and `key`, then `hint`) when none does."""
  for i, (pattern, _) in enumerate(rows):
    if pattern.fullmatch(name):
      return i
  raise ValueError(f"Parameter {name!r} matches no {key} regex"
                   f"{'; ' + hint if hint else ''}.")

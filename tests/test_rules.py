"""The one rule-table reading behind config.schedule and config.sharding_strategy."""

import pytest

from paligemma import optim
from paligemma import rules
from paligemma import sharding

PRESETS = {"all": [(".*", "x")]}


def test_first_full_match_wins():
  table = rules.table([("llm/layers/attn/.*", "a"), ("llm/.*", "b"), (".*", "c")], PRESETS,
                      "config.k")
  assert [table[rules.first_match(table, n, "config.k")][1] for n in
          ("llm/layers/attn/q_einsum/w", "llm/embedder/input_embedding", "img/head/bias")] == \
      ["a", "b", "c"]
  # Whole names only: a regex matching part of the name does not count.
  table = rules.table([("llm", "a"), ("attn", "b"), ("img/head", "c")], PRESETS, "config.k")
  for name in ("llm/layers/attn/q_einsum/w", "img/head/bias"):
    with pytest.raises(ValueError, match=f"Parameter '{name}' matches no config.k regex"):
      rules.first_match(table, name, "config.k")


def test_presets_and_entry_errors_name_the_key():
  assert [v for _, v in rules.table("all", PRESETS, "config.k")] == ["x"]
  with pytest.raises(ValueError, match=r"config.k 'al' is not a preset; use one of \['all'\]"):
    rules.table("al", PRESETS, "config.k")
  with pytest.raises(ValueError, match="config.k entry .* must be a"):
    rules.table([(".*", "x", "y")], PRESETS, "config.k")
  with pytest.raises(ValueError, match="config.k entry 'ab' must be a"):
    rules.table(["ab"], PRESETS, "config.k")
  with pytest.raises(ValueError, match=r"config.k regex '\(' is invalid"):
    rules.table([("(", "x")], PRESETS, "config.k")
  with pytest.raises(ValueError, match="matches no c regex; add one"):
    rules.first_match([], "p", "c", hint="add one")


def test_schedule_and_sharding_read_tables_alike():
  # The same table: the same row for every name, in optim's groups and sharding's rules.
  table = [("img/.*", "replicate"), ("llm/layers/.*", "fsdp"), ("llm/.*", "replicate")]
  names = ["img/head/kernel", "llm/layers/mlp/linear", "llm/final_norm/scale"]
  groups = optim.groups_from_config([(p, {"decay": v}) for p, v in table], {})
  index = optim.assign_groups(names, groups)
  rows = sharding.resolve_rules(table)
  assert [index[n] for n in names] == [rules.first_match(rows, n, "k") for n in names]
  # Sharding alone ends with a catch-all: unmatched parameters are replicated.
  with pytest.raises(ValueError, match="'other/w' matches no config.schedule"):
    optim.assign_groups(["other/w"], groups)
  assert rows[rules.first_match(rows, "other/w", "k")][1] == "replicate"

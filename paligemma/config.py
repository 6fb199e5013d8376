r"""Transfer configs from the command line: the file, its `:arg`, and `--config.KEY=VALUE`.

  python -m paligemma.train --config transfers/shapes.py:task=detect \
      --config.optim.lr=3e-4 --config.model.llm.mlp_dim=256 --config.evals='{}'

A transfer config is a Python file whose `get_config(arg)` returns an
ml_collections.ConfigDict (`arg` is what follows the first ":" after `.py`). Each
`--config.KEY=VALUE` then sets one key:
- an existing key takes VALUE in its own type: int, float, str, bool (true/false,
  yes/no, 1/0) or, for keys typed `object` (mesh, schedule, ...), a Python literal
  (`[("data", 4)]`), a plain word staying a string; `None` unsets it;
- a new key may be added only inside the free-form dicts (`FREE_FORM`: tower options,
  data-source options, optimizer kwargs, evaluators), its value read as a literal.
Every mistake (unknown key, wrong type, bad bool, missing file) raises `ConfigError`
with one line naming the key and the fix; the command-line tools print that line and
exit with status 2, without a traceback.
"""

import ast
import difflib
import importlib.util
import os
import sys

from absl import app
import ml_collections

from paligemma import clean_exit

# Dicts whose keys are not fixed by the trainer's schema: new keys may be added there
# (their owners validate them: the tower variants, make_source, optax, the evaluators).
FREE_FORM = ("model.img", "model.llm", "input.data", "optim.kwargs", "optim.schedule",
             "evals", "evals.*", "evals.*.data")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class ConfigError(ValueError):
  """A config mistake; the message is one line naming the key and the fix."""


def parse_bool(key, text):
  """'true'/'false' (yes/no, 1/0, on/off) -> bool; anything else raises ConfigError."""
  word = str(text).strip().lower()
  if word in _TRUE:
    return True
  if word in _FALSE:
    return False
  raise ConfigError(f"{key}={text!r} is not a bool; use {key}=true or {key}=false.")


def load_file(spec):
  """ConfigDict from "path/to/config.py[:arg]" (get_config(arg))."""
  path, sep, arg = spec.partition(".py:")
  path = path + ".py" if sep else spec
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} not found (--config takes path/to/config.py"
                      "[:key=value,...]).")
  name = "paligemma_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path} has no get_config(arg) function.")
  try:
    config = module.get_config(arg) if sep else module.get_config()
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{path}:{arg}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict.")
  return config


def _free_form(path):
  parts = path.split(".")
  return any(len(p.split(".")) == len(parts) and
             all(a in ("*", b) for a, b in zip(p.split("."), parts)) for p in FREE_FORM)


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A plain word: a string.


def _typed(flag, kind, text):
  """`text` as a value of type `kind` (the field's declared type)."""
  if text.strip() in ("None", "none", "null"):
    return None
  if kind is bool:
    return parse_bool(flag, text)
  if kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      example = "100" if kind is int else "3e-4"
      raise ConfigError(f"{flag}={text!r} is not {'an int' if kind is int else 'a float'}; "
                        f"e.g. {flag}={example}.") from None
  if kind is str:
    return text
  return _literal(text)  # `object` fields (mesh, schedule, ...) and dicts: a literal.


def _kind(parent, name):
  """The declared type of a field (a placeholder keeps one while its value is None)."""
  if isinstance(parent, ml_collections.ConfigDict):
    kind = parent.get_ref(name).get_type()
    if kind not in (int, float, bool, str):
      return object
    return kind
  value = parent[name]
  return type(value) if isinstance(value, (int, float, bool, str)) else object


def set_key(config, key, text):
  """config[key] = text parsed (see the module docstring); key like "optim.lr"."""
  names = key.split(".")
  parent, path = config, []
  for name in names[:-1]:
    path.append(name)
    child = parent.get(name) if isinstance(parent, (dict, ml_collections.ConfigDict)) else None
    if child is None:
      if _free_form(".".join(path[:-1])) and isinstance(parent, ml_collections.ConfigDict):
        with parent.unlocked():
          parent[name] = ml_collections.ConfigDict()
        child = parent[name]
      else:
        raise unknown_key(config, ".".join(path))
    if not isinstance(child, (dict, ml_collections.ConfigDict)):
      raise ConfigError(f"config.{'.'.join(path)} is {type(child).__name__}, not a dict: "
                        f"it has no key {names[len(path)]!r}.")
    parent = child
  name, where = names[-1], ".".join(names[:-1])
  flag = f"--config.{key}"
  if name in parent:
    value = _typed(flag, _kind(parent, name), text)
    if isinstance(parent[name], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(f"{flag}={text!r}: config.{key} is a dict of settings; set its "
                          f"keys ({flag}.KEY=VALUE) or give a dict ({flag}=\"{{...}}\").")
      value = ml_collections.ConfigDict(value)
  elif _free_form(where):
    value = _literal(text)
  else:
    raise unknown_key(config, key)
  try:
    if isinstance(parent, ml_collections.ConfigDict):
      with parent.unlocked():
        parent[name] = value
    else:
      parent[name] = value
  except TypeError as e:
    raise ConfigError(f"{flag}={text!r}: {e}") from None


def unknown_key(config, key):
  """ConfigError for a key the schema lacks, suggesting the closest valid ones."""
  parent_key, _, name = key.rpartition(".")
  parent = config
  for part in filter(None, parent_key.split(".")):
    parent = parent[part]
  valid = sorted(parent.keys()) if hasattr(parent, "keys") else []
  close = difflib.get_close_matches(name, valid, n=2)
  hint = f"did you mean {' or '.join(repr(f'{parent_key}.{c}'.lstrip('.')) for c in close)}? " \
      if close else ""
  return ConfigError(f"Unknown config key {key!r}; {hint}valid keys here: {valid}.")


def load(spec, overrides=()):
  """ConfigDict of `spec` ("file.py[:arg]") with [(key, text)] overrides applied."""
  config = load_file(spec)
  for key, text in overrides:
    set_key(config, key, text)
  return config


def split_argv(argv):
  """(spec, [(key, text)], rest): the --config flags taken out of `argv`."""
  spec, overrides, rest = None, [], []
  args = iter(argv)
  for arg in args:
    if arg == "--config" or arg.startswith("--config=") or arg.startswith("--config."):
      flag, eq, value = arg.partition("=")
      if not eq:
        value = next(args, None)
        if value is None:
          raise ConfigError(f"{flag} needs a value ({flag}=VALUE).")
      if flag == "--config":
        spec = value
      else:
        overrides.append((flag[len("--config."):], value))
    else:
      rest.append(arg)
  return spec, overrides, rest


# Keys of big_vision's configs that mean something else here: a config ported from it
# must not run with them silently ignored.
_BIG_VISION_KEYS = {
    "sharding_rules": "big_vision's activation sharding; here the batch is split over "
                      "config.batch_axes and parameters are placed by "
                      "config.sharding_strategy (paligemma/sharding.py)",
}


def validate(config):
  """Raises ConfigError naming any key the trainer does not know (a typo in a config)."""
  # Imported here: transfer_configs imports this module (parse_bool).
  from paligemma import transfer_configs  # pylint: disable=g-import-not-at-top
  base = transfer_configs.base_config()
  for key in config:
    if key in _BIG_VISION_KEYS:
      raise ConfigError(f"Unknown config key {key!r}: {_BIG_VISION_KEYS[key]}.")
    if key not in base:
      raise unknown_key(base, key)
  for group in ("model", "input", "optim", "lora"):
    for key in config[group]:
      if key not in base[group]:
        raise unknown_key(base, f"{group}.{key}")
  for name, ev in config.evals.items():
    for key in ("type", "data", "every"):
      if key not in ev:
        raise ConfigError(f"config.evals.{name} needs a `{key}`.")
  for kind in ("img", "llm"):
    _check_tower(kind, dict(config.model[kind]))
  _check_lora(config)
  res = config.model.img.get("image_size")
  if res is not None and res != config.input.image_size:
    raise ConfigError(f"config.input.image_size={config.input.image_size} but "
                      f"config.model.img.image_size={res}: set both to the same resolution.")


def _check_lora(config):
  """config.lora resolves, and config.schedule does not train the base under it."""
  from paligemma import lora as lora_lib  # pylint: disable=g-import-not-at-top
  try:
    lora = lora_lib.LoraConfig.from_dict(config.lora.to_dict())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  vocab = config.model.get("llm", {}).get("vocab_size")
  if lora and lora.tokens and vocab:
    try:
      lora_lib.token_ids(lora.tokens, vocab)
    except ValueError as e:
      raise ConfigError(f"{e} (config.model.llm.vocab_size)") from None
  if lora and config.schedule == "full":
    raise ConfigError(
        f"config.lora.rank={lora.rank} with config.schedule='full' would train the whole "
        "model besides the adapters: set --config.schedule=lora (only the adapters train, "
        "as in PEFT) or a list of (regex, schedule) rules.")
  if not lora and config.schedule == "lora":
    raise ConfigError("config.schedule='lora' trains only LoRA adapters, but "
                      "config.lora.rank is 0: set it (e.g. --config.lora.rank=8).")


def _check_tower(kind, given):
  """Tower keys known and typed as the variant's (a string where an int belongs fails here,
  not deep inside the model)."""
  from paligemma.models import variants  # pylint: disable=g-import-not-at-top
  resolve = variants.resolve_vit if kind == "img" else variants.resolve_gemma
  try:
    reference = resolve({"variant": given["variant"]} if given.get("variant") else {})
  except ValueError as e:
    raise ConfigError(f"config.model.{kind}: {e}") from None
  except KeyError:
    reference = {}
  defaults = variants.VIT_DEFAULTS if kind == "img" else variants.GEMMA_DEFAULTS
  fields = variants.VIT_FIELDS if kind == "img" else variants.GEMMA_FIELDS
  for key, value in given.items():
    if key not in fields:
      raise ConfigError(f"Unknown config key 'model.{kind}.{key}'; valid keys here: "
                        f"{sorted(fields)}.")
    want = reference.get(key, defaults.get(key))
    if want is None or value is None or key == "variant":
      continue
    ok = (isinstance(value, bool) if isinstance(want, bool) else
          isinstance(value, int) and not isinstance(value, bool) if isinstance(want, int) else
          isinstance(value, (int, float)) and not isinstance(value, bool)
          if isinstance(want, float) else isinstance(value, type(want)))
    if not ok:
      raise ConfigError(f"config.model.{kind}.{key}={value!r} must be "
                        f"{type(want).__name__} (e.g. {want!r}).")


def run(main):
  """absl's app.run for a tool that takes a transfer config: calls main(argv, config).

  The --config flags are read here, not by absl (which cannot add keys or give a
  one-line error); config is None when --config is absent. A ConfigError, from loading
  or raised by `main` (validation), prints one line and exits with status 2. The process
  ends through clean_exit.run: never returns.
  """
  given = {}

  def parse(argv):
    try:
      given["spec"], given["overrides"], rest = split_argv(argv)
    except ConfigError as e:
      _fail(e)
    return app.parse_flags_with_usage(rest)

  def wrapped(argv):
    try:
      if given["spec"] is None and given["overrides"]:
        raise ConfigError(f"--config.{given['overrides'][0][0]} needs --config FILE too.")
      config = given["spec"] and load(given["spec"], given["overrides"])
      return main(argv, config)
    except (ConfigError, FileNotFoundError) as e:  # A bad key, value or path: one line.
      _fail(e)

  clean_exit.run(app.run, wrapped, flags_parser=parse)


def _fail(error):
  print(f"error: {error}", file=sys.stderr)
  sys.exit(2)

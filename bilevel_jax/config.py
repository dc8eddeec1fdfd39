"""Run configuration: ml_collections config files with a typed schema.

A config file is a Python file with ``get_config(arg=None)`` returning an ``ml_collections.ConfigDict``,
as in the Flax examples; it starts from :func:`base_config` (the schema: every key, its type and its
default) and changes what it needs. On the command line::

    bilevel-jax run --config configs/demo.py --config.select.steps=20 --config.seed=1
    bilevel-jax run --config configs/ablations.py:unroll_k=4

Whatever a file or an override sets is checked by :func:`validate` against the schema: an unknown key
or a value of the wrong type is an error that names the key, and keys with a fixed set of choices
(estimator, parametrization, selection rule, ...) must hold one of them. The resolved config is
saved as JSON with every run (:func:`save_json`) and loads back with :func:`from_json`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict

METHODS = ("bds", "bmo", "full_sft", "direct_mixing", "random_selection", "val_only",
           "loss_filter", "one_step")
ESTIMATORS = ("unroll", "penalty", "penalty_vf", "implicit", "one_step", "likelihood_ratio")
SCORES = ("length", "base_loss", "loss_change", "one_step", "random")

# Keys whose value must be one of a fixed set. Tuples of strings are checked element-wise.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.source": ("tiny", "smollm2", "safetensors", "gguf"),
    "model.dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("", "float32", "bfloat16"),
    "model.trainable.kind": ("full", "lora", "last_n_layers"),
    "select.estimator": ESTIMATORS,
    "select.parametrization": ("softmax_n", "sigmoid2"),
    "select.rule": ("top_p", "threshold", "soft"),
    "select.logits_optimizer": ("adam", "sgd"),
    "select.inner_optimizer": ("sgd", "adam", "adamw"),
    "finetune.optimizer": ("sgd", "adam", "adamw"),
    "refine.choose": ("lowest_weight", "random"),
    "refine.weight_variant": ("token", "response"),
    "run.methods": METHODS,
    "run.selection_scores": SCORES,
    "mesh.rules": ("fsdp", "dp"),
    "mesh.weights": ("replicated", "data"),
}


def base_config() -> ConfigDict:
  """The schema: every key a run understands, with its type and default (a tiny CPU run)."""
  c = ConfigDict()
  c.name = "run"
  c.seed = 0
  c.workdir = ""  # Output directory; "" means runs/<name>.

  c.model = ConfigDict()
  c.model.source = "tiny"  # tiny (random, tests), smollm2 (embedded GGUF), safetensors, gguf.
  c.model.path = ""  # Directory (safetensors) or file (gguf).
  c.model.dtype = "float32"  # The params' dtype, and the compute dtype unless set below.
  # "" = model.dtype. "bfloat16" with f32 params is mixed precision (f32 params and optimizer, bf16
  # matmuls, as PyTorch's autocast): on a CPU with bf16 units, with trainable.per_layer=True, the
  # full and LoRA SFT steps took about half the f32 step's time (docs/benchmarks.md).
  c.model.compute_dtype = ""
  c.model.remat = False
  c.model.tiny_d_model = 32
  c.model.tiny_n_layers = 2
  c.model.trainable = ConfigDict()
  c.model.trainable.kind = "last_n_layers"
  c.model.trainable.n_layers = 1
  c.model.trainable.lora_rank = 8
  c.model.trainable.lora_alpha = 16.0
  # Decoder layers stored per layer instead of stacked (full, lora, last_n_layers): a faster
  # full fine-tuning step on XLA:CPU, about twice the compile time (see bilevel_jax.model.lora).
  c.model.trainable.per_layer = False

  c.data = ConfigDict()
  c.data.pool = "safety_matched"
  c.data.data_dir = ""  # "" means the package default cache.
  c.data.max_len = 128
  c.data.pool_size = 0  # 0 keeps every pool record.
  c.data.val_size = 0
  c.data.test_size = 0
  c.data.batch_size = 8
  c.data.val_batch_size = 8
  c.data.shuffle_seed = 0

  c.select = ConfigDict()
  c.select.estimator = "likelihood_ratio"
  c.select.estimator_kwargs = ConfigDict()  # Passed to hypergrad.make_estimator(name, **kwargs).
  c.select.parametrization = "softmax_n"
  c.select.steps = 30
  # Adam (the default) moves a logit by about lr * sign of its score on each visit; "sgd"
  # keeps the score's size, which lifted penalty with weight_score=loss_change (selection study).
  c.select.logits_optimizer = "adam"
  c.select.logits_lr = 0.1
  c.select.inner_optimizer = "sgd"
  c.select.inner_lr = 1e-2
  c.select.rule = "top_p"
  c.select.keep_fraction = 0.5

  c.finetune = ConfigDict()
  c.finetune.steps = 40
  c.finetune.optimizer = "adamw"
  c.finetune.lr = 1e-4
  c.finetune.weight_decay = 0.0
  c.finetune.batch_size = 8
  # Every method's training set also holds the trusted validation pairs: the methods then differ
  # only in what they add from the pool (direct_mixing: all of it; val_only: nothing).
  c.finetune.with_validation = False

  c.refine = ConfigDict()
  c.refine.choose = "lowest_weight"
  c.refine.share = 0.25  # r: the share of questions regenerated.
  c.refine.responses_per_question = 2  # G
  c.refine.period = 10  # F: regenerate every F steps ...
  c.refine.warmup = 10  # ... after this many steps.
  c.refine.dynamic = False  # Re-choose the questions every round.
  c.refine.steps = 40
  c.refine.temperature = 0.7
  c.refine.top_k = 0
  c.refine.top_p = 1.0
  c.refine.max_new_tokens = 48
  c.refine.weight_variant = "token"
  c.refine.clip = 10.0

  c.evaluate = ConfigDict()
  c.evaluate.max_new_tokens = 48
  c.evaluate.batch_size = 8
  c.evaluate.n_harmful = 0  # 0: every held-out prompt.
  c.evaluate.n_benign = 0
  c.evaluate.n_gsm8k = 0
  c.evaluate.generate = True

  c.run = ConfigDict()
  c.run.methods = ("bds", "direct_mixing", "random_selection")
  c.run.selection_scores = ("length", "base_loss", "random")
  c.run.selection_seeds = 1

  c.checkpoint = ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.metrics = ConfigDict()
  c.metrics.max_nonfinite = 5
  c.metrics.tensorboard = True
  c.metrics.progress_interval = 30.0

  c.mesh = ConfigDict()
  # (data, fsdp, tensor); -1 fills with the remaining devices. FSDP by default: params, gradients
  # and optimizer state split over every device, batch rows too (sharding.FSDP_RULES).
  c.mesh.shape = (1, -1, 1)
  c.mesh.distributed = False  # Call jax.distributed.initialize() (multi-host).
  c.mesh.rules = "fsdp"  # Logical-axis rules (bilevel_jax.sharding): fsdp or dp (replicated params).
  c.mesh.weights = "replicated"  # Weight logits: replicated, or split over the data axis.
  c.mesh.coordinator_address = ""  # host:port of process 0; "" = auto-detect (TPU, SLURM, GKE).
  c.mesh.num_processes = 0  # 0 = auto-detect.
  c.mesh.process_id = -1  # -1 = auto-detect.
  return c


class ConfigError(ValueError):
  """A config has an unknown key, a wrong type or a value outside its choices."""


def _type_ok(want: Any, got: Any) -> bool:
  if isinstance(want, bool):
    return isinstance(got, bool)
  if isinstance(want, int):
    return isinstance(got, int) and not isinstance(got, bool)
  if isinstance(want, float):
    return isinstance(got, (int, float)) and not isinstance(got, bool)
  if isinstance(want, tuple):
    if not isinstance(got, tuple):
      return False
    if want and got:
      return all(_type_ok(want[0], g) for g in got)
    return True
  return isinstance(got, type(want))


def validate(cfg: ConfigDict, where: str = "config") -> ConfigDict:
  """Checks ``cfg`` against :func:`base_config`; raises :class:`ConfigError` naming the key."""
  schema = base_config()

  def walk(sch: ConfigDict, got: ConfigDict, prefix: str):
    for key in got.keys():
      path = f"{prefix}{key}"
      if key not in sch:
        known = ", ".join(sorted(sch.keys()))
        raise ConfigError(f"{where}: unknown key {path!r} (known here: {known})")
      want, val = sch[key], got[key]
      if isinstance(want, ConfigDict):
        if not isinstance(val, ConfigDict):
          raise ConfigError(f"{where}: {path!r} must be a section, got {type(val).__name__}")
        if path != "select.estimator_kwargs":  # Free-form: checked by the estimator registry.
          walk(want, val, path + ".")
        continue
      if not _type_ok(want, val):
        raise ConfigError(f"{where}: {path!r} must be of type {type(want).__name__}"
                          f"{' of ' + type(want[0]).__name__ if isinstance(want, tuple) and want else ''}"
                          f", got {val!r} ({type(val).__name__})")
      if path in CHOICES:
        values = val if isinstance(val, tuple) else (val,)
        for v in values:
          if v not in CHOICES[path]:
            raise ConfigError(f"{where}: {path!r} = {v!r} is not one of {CHOICES[path]}")
    for key in sch.keys():
      if key not in got:
        raise ConfigError(f"{where}: missing key {prefix}{key!s} (start config files from "
                          "bilevel_jax.config.base_config())")

  walk(schema, cfg, "")
  if not 0.0 < cfg.select.keep_fraction <= 1.0:
    raise ConfigError(f"{where}: select.keep_fraction must be in (0, 1], got {cfg.select.keep_fraction}")
  if not 0.0 <= cfg.refine.share <= 1.0:
    raise ConfigError(f"{where}: refine.share must be in [0, 1], got {cfg.refine.share}")
  for key in ("data.batch_size", "data.val_batch_size", "data.max_len", "finetune.batch_size",
              "evaluate.batch_size", "checkpoint.every"):
    sec, name = key.split(".")
    if cfg[sec][name] <= 0:
      raise ConfigError(f"{where}: {key} must be positive, got {cfg[sec][name]}")
  if cfg.checkpoint.max_to_keep < 2:
    raise ConfigError(f"{where}: checkpoint.max_to_keep must be >= 2, got {cfg.checkpoint.max_to_keep}")
  return cfg


def parse_value(text: str) -> Any:
  """Parses an override's value: Python literals (1, 0.5, (1, 2), 'x'), true/false, else a string."""
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(cfg: ConfigDict, key: str, value: Any, where: str = "override") -> None:
  """Sets ``cfg.<key> = value`` (dotted key); unknown keys and wrong types raise ConfigError."""
  parts = key.split(".")
  node = cfg
  for i, p in enumerate(parts[:-1]):
    if p not in node or not isinstance(node[p], ConfigDict):
      raise ConfigError(f"{where}: unknown key {'.'.join(parts[:i + 1])!r}")
    node = node[p]
  leaf = parts[-1]
  in_free = parts[:-1] == ["select", "estimator_kwargs"]
  if leaf not in node and not in_free:
    raise ConfigError(f"{where}: unknown key {key!r}")
  if leaf in node and isinstance(node[leaf], tuple) and isinstance(value, (list, str)):
    value = tuple(value) if isinstance(value, list) else tuple(v for v in value.split(",") if v)
  if leaf in node and isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if leaf in node and not _type_ok(node[leaf], value):
    raise ConfigError(f"{where}: {key!r} must be of type {type(node[leaf]).__name__}, got "
                      f"{value!r} ({type(value).__name__})")
  with node.unlocked():
    node[leaf] = value


def load_file(spec: str) -> ConfigDict:
  """Loads ``path.py`` or ``path.py:arg`` by calling its ``get_config()`` / ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  p = Path(path)
  if not p.is_file():
    raise ConfigError(f"config file {path!r} not found")
  mod_spec = importlib.util.spec_from_file_location(f"_bilevel_config_{p.stem}", p)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config()")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except (TypeError, AttributeError, KeyError) as e:
    # ml_collections refuses a value of the wrong type already at assignment time.
    raise ConfigError(f"{spec}: {e}") from e
  if not isinstance(cfg, ConfigDict):
    raise ConfigError(f"{spec}: get_config() must return an ml_collections.ConfigDict")
  return cfg


def load(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads a config file, applies ``key=value`` overrides and validates the result.

  Args:
    spec: ``configs/X.py`` or ``configs/X.py:variant``.
    overrides: ``"select.steps=20"`` strings (the ``--config.`` prefix already removed).
  Returns:
    The validated, locked config.
  """
  cfg = load_file(spec)
  validate(cfg, where=spec)
  for item in overrides:
    key, eq, raw = item.partition("=")
    if not eq:
      raise ConfigError(f"override {item!r} must look like --config.key=value")
    apply_override(cfg, key.strip(), parse_value(raw), where=f"--config.{key.strip()}")
  validate(cfg, where=spec + " with overrides" if overrides else spec)
  cfg.lock()
  return cfg


def to_dict(cfg: ConfigDict) -> dict:
  """A JSON-ready dict (tuples become lists)."""
  return json.loads(cfg.to_json())


def from_json(text_or_dict: str | dict) -> ConfigDict:
  """Rebuilds a validated config from :func:`to_dict` / :func:`save_json` output."""
  data = json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
  cfg = base_config()

  def fill(node: ConfigDict, values: dict, prefix: str):
    for key, val in values.items():
      path = prefix + key
      if isinstance(val, dict) and (key in node and isinstance(node[key], ConfigDict)):
        if path == "select.estimator_kwargs":
          node[key] = ConfigDict(val)
        else:
          fill(node[key], val, path + ".")
      else:
        apply_override(cfg, path, val, where="json")

  fill(cfg, data, "")
  return validate(cfg, where="json config")


def save_json(cfg: ConfigDict, path: str | Path) -> None:
  path = _path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def _path(path: str | Path) -> Path:
  """``pathlib.Path`` for local paths; ``etils.epath.Path`` for URLs (keeps ``gs://``)."""
  if "://" in str(path):
    from etils import epath
    return epath.Path(str(path))
  return Path(path)


def workdir(cfg: ConfigDict) -> Path:
  """The run's output directory.

  A URL (``gs://bucket/run``) comes back as an ``etils.epath.Path``, which keeps the scheme
  (``pathlib.Path`` would turn it into the local path ``gs:/bucket/run``); local paths stay
  ``pathlib.Path``.
  """
  return _path(cfg.workdir) if cfg.workdir else Path("runs") / cfg.name


def smollm2_base(pool: str = "safety_matched") -> ConfigDict:
  """Shared settings of the configs that run the embedded SmolLM2-135M-Instruct on a real pool.

  Only the last layers train (their frozen prefix is computed once per batch), sequences are short
  and the selection uses the closed-form ``likelihood_ratio`` estimator, so that a run fits a 2-core
  CPU; on a GPU or TPU raise the numbers (``--config.model.trainable.kind=full`` and so on).
  """
  c = base_config()
  c.model.source = "smollm2"
  c.model.trainable.kind = "last_n_layers"
  c.model.trainable.n_layers = 4
  c.data.pool = pool
  c.data.max_len = 96
  c.data.batch_size = 8
  c.data.val_batch_size = 8
  c.select.estimator = "likelihood_ratio"
  c.select.steps = 30
  c.select.inner_lr = 1e-3
  c.finetune.steps = 30
  c.finetune.lr = 1e-4
  c.evaluate.max_new_tokens = 32
  c.evaluate.batch_size = 16
  c.run.selection_scores = ("length", "base_loss", "random")
  return c

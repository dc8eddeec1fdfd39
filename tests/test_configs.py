"""Every config file loads, validates and round-trips through JSON; overrides are type-checked."""

import json
from pathlib import Path

import pytest

from bilevel_jax import config as C

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))


def _ablation_specs():
  import importlib.util
  spec = importlib.util.spec_from_file_location("abl", ROOT / "configs" / "ablations.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return [f"{ROOT / 'configs' / 'ablations.py'}:{v}" for v in mod.VARIANTS]


ALL_SPECS = [str(p) for p in CONFIG_FILES] + _ablation_specs()


def test_the_expected_configs_exist():
  names = {p.stem for p in CONFIG_FILES}
  assert {"demo", "safety_bds", "quality_bds", "math_bds", "safety_bmo_online", "full_sft",
          "direct_mixing", "random_selection", "val_only", "loss_filter", "one_step",
          "ablations"} <= names


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: Path(s.split(":")[0]).stem + (
    ":" + s.split(":")[1] if ":" in s else ""))
def test_config_loads_validates_and_round_trips(spec, tmp_path):
  cfg = C.load(spec)
  C.save_json(cfg, tmp_path / "config.json")
  back = C.from_json((tmp_path / "config.json").read_text())
  assert C.to_dict(back) == C.to_dict(cfg)
  assert back.run.methods == cfg.run.methods and isinstance(back.run.methods, tuple)


def test_estimator_kwargs_match_the_registry():
  hypergrad = pytest.importorskip("bilevel_jax.core.hypergrad")
  for spec in ALL_SPECS:
    cfg = C.load(spec)
    hypergrad.make_estimator(cfg.select.estimator, **cfg.select.estimator_kwargs.to_dict())


def test_overrides_apply_with_types(tmp_path):
  demo = str(ROOT / "configs" / "demo.py")
  cfg = C.load(demo, ["select.steps=7", "finetune.lr=1", "model.remat=true",
                      "run.methods=bds,val_only", "workdir=/tmp/x"])
  assert cfg.select.steps == 7
  assert cfg.finetune.lr == 1.0 and isinstance(cfg.finetune.lr, float)
  assert cfg.model.remat is True and cfg.run.methods == ("bds", "val_only")
  assert cfg.workdir == "/tmp/x"


@pytest.mark.parametrize("override,message", [
    ("select.stepz=3", "unknown key 'select.stepz'"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("select.steps=abc", "'select.steps' must be of type int"),
    ("select.steps=1.5", "'select.steps' must be of type int"),
    ("model.remat=3", "'model.remat' must be of type bool"),
    ("select.estimator=magic", "'select.estimator' = 'magic' is not one of"),
    ("run.methods=bds,oracle", "'run.methods' = 'oracle' is not one of"),
    ("select.keep_fraction=1.5", "keep_fraction must be in"),
    ("select.steps", "must look like --config.key=value"),
])
def test_bad_overrides_are_errors(override, message):
  with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    C.load(str(ROOT / "configs" / "demo.py"), [override])


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
  f = tmp_path / "bad.py"
  f.write_text("from bilevel_jax.config import base_config\n"
               "def get_config():\n  c = base_config()\n  c.select.typo_key = 1\n  return c\n")
  with pytest.raises(C.ConfigError, match=r"bad.py: unknown key 'select.typo_key'"):
    C.load(str(f))
  f.write_text("from bilevel_jax.config import base_config\n"
               "def get_config():\n  c = base_config()\n  c.data.max_len = '96'\n  return c\n")
  with pytest.raises(C.ConfigError, match=r"bad.py: .*'max_len'.*cannot be casted to type <class 'int'>"):
    C.load(str(f))


def test_unknown_ablation_variant_is_an_error():
  with pytest.raises(C.ConfigError, match="unknown variant 'unrol_k=4'"):
    C.load(str(ROOT / "configs" / "ablations.py") + ":unrol_k=4")


def test_ablation_variant_sets_its_knob():
  cfg = C.load(str(ROOT / "configs" / "ablations.py") + ":unroll_k=4,top_p=0.8")
  assert cfg.select.estimator == "unroll" and cfg.select.estimator_kwargs.k == 4
  assert cfg.select.keep_fraction == 0.8 and cfg.select.rule == "top_p"
  assert cfg.name == "ablation_unroll_k-4_top_p-0.8"


def test_json_with_unknown_key_is_rejected():
  d = C.to_dict(C.base_config())
  d["data"]["colour"] = "red"
  with pytest.raises(C.ConfigError, match="unknown key 'data.colour'"):
    C.from_json(json.dumps(d))


def test_loaded_config_is_locked():
  cfg = C.load(str(ROOT / "configs" / "demo.py"))
  with pytest.raises(AttributeError):
    cfg.select.new_key = 1

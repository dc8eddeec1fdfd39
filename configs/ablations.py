"""Ablations over the paper's knobs, as named variants of one base run.

Usage: ``bilevel-jax run --config configs/ablations.py:unroll_k=4``; several knobs are joined with
commas (``configs/ablations.py:estimator=penalty,top_p=0.8``). ``VARIANTS`` lists the named variants
the test suite loads; any knob in ``KNOBS`` takes any value of the right type.
"""

from bilevel_jax.config import ConfigError, parse_value, smollm2_base

# knob -> (config key it sets, extra settings it implies)
KNOBS = {
    "estimator": ("select.estimator", {}),
    "unroll_k": ("select.estimator_kwargs.k", {"select.estimator": "unroll"}),
    "parametrization": ("select.parametrization", {}),
    "top_p": ("select.keep_fraction", {"select.rule": "top_p"}),
    "rule": ("select.rule", {}),
    "lambda_decay": ("select.estimator_kwargs.lam_decay", {"select.estimator": "penalty"}),
    "weight_score": ("select.estimator_kwargs.weight_score", {"select.estimator": "penalty"}),
    "logits_optimizer": ("select.logits_optimizer", {}),
    "logits_lr": ("select.logits_lr", {}),
    "share": ("refine.share", {"refine.choose": "random"}),
    "responses_per_question": ("refine.responses_per_question", {}),
    "period": ("refine.period", {}),
    "dynamic": ("refine.dynamic", {}),
    "trainable": ("model.trainable.kind", {}),
    # Speed, not selection: bf16 matmuls with f32 params (fine-tuning; keep f32 for selection) and
    # per-layer storage (the fast layout for it on CPU; docs/benchmarks.md).
    "compute_dtype": ("model.compute_dtype", {}),
    "per_layer": ("model.trainable.per_layer", {}),
}

VARIANTS = (
    "estimator=unroll", "estimator=penalty", "estimator=penalty_vf", "estimator=implicit",
    "estimator=one_step", "estimator=likelihood_ratio",
    "unroll_k=1", "unroll_k=2", "unroll_k=4",
    "parametrization=softmax_n", "parametrization=sigmoid2",
    "top_p=0.5", "top_p=0.8", "rule=threshold", "rule=soft",
    "lambda_decay=0.5", "lambda_decay=0.9", "weight_score=loss_change",
    "logits_optimizer=sgd", "logits_optimizer=adam", "logits_lr=1.0",
    "share=0.1", "share=0.25", "share=0.5",
    "responses_per_question=1", "responses_per_question=4",
    "period=5", "period=20", "dynamic=True", "dynamic=False",
    "trainable=lora", "trainable=last_n_layers",
    "compute_dtype=bfloat16", "per_layer=True",
)


def get_config(arg: str = ""):
  from bilevel_jax.config import apply_override
  c = smollm2_base("safety_matched")
  c.name = "ablation"
  uses_refine = False
  for item in [a for a in arg.split(",") if a]:
    knob, eq, raw = item.partition("=")
    if not eq or knob not in KNOBS:
      raise ConfigError(f"configs/ablations.py: unknown variant {item!r}; knobs: {sorted(KNOBS)}")
    key, implied = KNOBS[knob]
    for k, v in implied.items():
      apply_override(c, k, v, where=f"ablation {item}")
    apply_override(c, key, parse_value(raw), where=f"ablation {item}")
    uses_refine |= key.startswith("refine.")
    c.name += "_" + item.replace("=", "-")
  c.run.methods = ("bds", "bmo", "direct_mixing") if uses_refine else ("bds", "direct_mixing")
  return c

"""The main job on the embedded defaults: SmolLM2-135M-Instruct on the ``safety_matched`` pool.

BDS selection (closed-form ``likelihood_ratio`` scores, last 4 layers trainable), fine-tuning on the
kept half, the direct-mixing and random-selection baselines, judge-free evaluation and the report.
Sized to finish within 15 minutes on a 2-core CPU after set-up.
"""

from bilevel_jax.config import smollm2_base


def get_config():
  c = smollm2_base("safety_matched")
  c.name = "demo"
  c.run.methods = ("bds", "direct_mixing", "random_selection")
  # safety_matched's good half is refusals only: fine-tuned on a correct selection alone, the model
  # refused 96% of benign prompts (measured). With the trusted validation pairs (refusals and good
  # benign answers) in every method's training set, the methods differ only in what they add.
  c.finetune.with_validation = True
  c.evaluate.n_harmful = 48
  c.evaluate.n_benign = 48
  c.checkpoint.every = 10
  return c

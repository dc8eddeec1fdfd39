"""BDS followed by online self-refinement (BMO): the lowest-weighted questions keep their place with
regenerated, importance-weighted responses instead of being dropped."""

from bilevel_jax.config import smollm2_base


def get_config():
  c = smollm2_base("safety")
  c.name = "safety_bmo_online"
  c.run.methods = ("bds", "bmo", "direct_mixing", "random_selection")
  c.refine.choose = "lowest_weight"
  # Half the `safety` pool is harmful (150 of 300): regenerating the lowest-weighted half lets the
  # harmful questions stay (with regenerated answers) instead of being dropped.
  c.refine.share = 0.5
  c.refine.responses_per_question = 2
  c.refine.period = 10
  c.refine.warmup = 10
  c.refine.steps = 40
  return c

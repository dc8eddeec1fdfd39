"""BDS followed by online self-refinement (BMO): the lowest-weighted questions keep their place with
regenerated, importance-weighted responses instead of being dropped."""

from bilevel_jax.config import smollm2_base


def get_config():
  c = smollm2_base("safety")
  c.name = "safety_bmo_online"
  c.run.methods = ("bds", "bmo", "direct_mixing", "random_selection")
  c.refine.choose = "lowest_weight"
  c.refine.share = 0.25
  c.refine.responses_per_question = 2
  c.refine.period = 10
  c.refine.warmup = 10
  c.refine.steps = 40
  return c

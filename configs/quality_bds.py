"""Offline bilevel data selection on the `quality` pool, against direct mixing and random selection."""

from bilevel_jax.config import smollm2_base


def get_config():
  c = smollm2_base("quality")
  c.name = "quality_bds"
  c.run.methods = ("bds", "full_sft", "direct_mixing", "random_selection", "loss_filter")
  c.run.selection_scores = ("length", "base_loss", "loss_change", "one_step", "random")
  c.run.selection_seeds = 3
  return c

"""Baseline `one_step` alone on the `safety_matched` pool (see bilevel_jax/loops.py for its definition)."""

from bilevel_jax.config import smollm2_base


def get_config():
  c = smollm2_base("safety_matched")
  c.name = "one_step"
  c.run.methods = ("one_step",)
  return c

"""Baseline `loss_filter` alone on the `safety_matched` pool (see bilevel_jax/loops.py for its definition)."""

from bilevel_jax.config import smollm2_base


def get_config():
  c = smollm2_base("safety_matched")
  c.name = "loss_filter"
  c.run.methods = ("loss_filter",)
  return c

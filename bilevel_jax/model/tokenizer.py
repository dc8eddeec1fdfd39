"""Tokenizers behind one small protocol, and the chat template.

Every tokenizer (byte-level BPE from GGUF metadata or a ``tokenizer.json``, SentencePiece ``.model``,
and the byte tokenizer used by tests) offers:

* ``encode(text) -> list[int]`` without adding any special token; ``decode(ids) -> str``;
* ``vocab_size``, ``eos_id`` (end of turn), ``pad_id``, ``bos_id`` (or None), ``stop_ids``;
* ``encode_chat(question, response=None, system=None) -> (prompt_ids, response_ids)``: the prompt
  ends with the assistant header, the response ends with the end-of-turn token(s), so that
  ``prompt_ids + response_ids`` is the full conversation and the loss covers ``response_ids`` only.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  pad_id: int
  bos_id: int | None
  stop_ids: tuple[int, ...]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def encode_chat(self, question: str, response: str | None = None,
                  system: str | None = None) -> tuple[list[int], list[int]]: ...


class ChatMLMixin:
  """ChatML (SmolLM2, Qwen2): ``<|im_start|>role\\ntext<|im_end|>\\n``.

  Subclasses provide ``encode`` and the ids of ``<|im_start|>`` / ``<|im_end|>`` as
  ``im_start_id`` / ``im_end_id``. Special tokens are inserted as ids, never parsed out of user
  text, so a question that contains the literal string ``<|im_end|>`` cannot break the template.
  """

  im_start_id: int
  im_end_id: int
  default_system: str | None = None

  def _turn(self, role: str, text: str) -> list[int]:
    return [self.im_start_id, *self.encode(f"{role}\n{text}"), self.im_end_id, *self.encode("\n")]

  def encode_chat(self, question, response=None, system=None):
    system = self.default_system if system is None else system
    prompt: list[int] = []
    if system:
      prompt += self._turn("system", system)
    prompt += self._turn("user", question)
    prompt += [self.im_start_id, *self.encode("assistant\n")]
    resp: list[int] = []
    if response is not None:
      resp = [*self.encode(response), self.im_end_id]
    return prompt, resp


class ByteTokenizer(ChatMLMixin):
  """UTF-8 bytes plus a few specials; for tests and tiny random models (vocab 261)."""

  def __init__(self):
    self.pad_id, self.bos_id, self.eos_id = 256, None, 258
    self.im_start_id, self.im_end_id = 257, 258
    self.vocab_size = 261
    self.stop_ids = (self.im_end_id,)

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

"""Tokenizers behind one small protocol, and the chat templates.

Every tokenizer (byte-level BPE from GGUF metadata or a ``tokenizer.json``, SentencePiece ``.model``,
and the byte tokenizer used by tests) offers:

* ``encode(text) -> list[int]`` without adding any special token; ``decode(ids) -> str``;
* ``vocab_size``, ``eos_id`` (end of turn), ``pad_id``, ``bos_id`` (or None), ``stop_ids``;
* ``encode_chat(question, response=None, system=None) -> (prompt_ids, response_ids)``: the prompt
  ends with the assistant header, the response ends with the end-of-turn token(s), so that
  ``prompt_ids + response_ids`` is the full conversation and the loss covers ``response_ids`` only.

Chat formats (chosen from the vocabulary, see :func:`chat_format_for_vocab`):

* ``chatml`` (SmolLM2, Qwen2) when the vocabulary has ``<|im_start|>`` and ``<|im_end|>``;
* ``llama3`` when it has ``<|start_header_id|>``, ``<|end_header_id|>`` and ``<|eot_id|>``;
* ``llama2`` otherwise: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{question} [/INST]`` as the
  prompt and ``{response}</s>`` as the response (Meta's format; the space between ``[/INST]`` and the
  answer is the word-boundary marker SentencePiece puts in front of the encoded response).

Special tokens are always inserted as ids and never parsed out of user text: a question containing
the literal string ``<|im_end|>`` is encoded as ordinary text.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

PathLike = str | os.PathLike


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
  ``system=None`` uses ``default_system`` (SmolLM2's template inserts one when the conversation has
  no system turn); ``system=""`` leaves the system turn out.
  """

  im_start_id: int
  im_end_id: int
  default_system: str | None = None
  # Whether the model expects a beginning-of-sequence token before the first turn.
  add_bos: bool = False

  def _turn(self, role: str, text: str) -> list[int]:
    return [self.im_start_id, *self.encode(f"{role}\n{text}"), self.im_end_id, *self.encode("\n")]

  def encode_chat(self, question, response=None, system=None):
    system = self.default_system if system is None else system
    prompt: list[int] = []
    if self.add_bos and getattr(self, "bos_id", None) is not None:
      prompt.append(self.bos_id)
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


# ----------------------------------------------------------------------------- chat formats

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def chat_format_for_vocab(has_token) -> str:
  """``chatml``, ``llama3`` or ``llama2`` depending on which special tokens ``has_token`` finds."""
  if all(has_token(t) for t in CHATML_TOKENS):
    return "chatml"
  if all(has_token(t) for t in LLAMA3_TOKENS):
    return "llama3"
  return "llama2"


_SYSTEM_IN_TEMPLATE = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def default_system_from_template(chat_template: str | None) -> str | None:
  """The system prompt a ChatML Jinja template inserts when none is given, or None.

  SmolLM2's template (in its GGUF metadata and ``tokenizer_config.json``) writes
  ``<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>``
  when the first message is not a system message; following it keeps fine-tuning prompts equal to
  the ones the model sees at inference.
  """
  if not chat_template:
    return None
  for match in _SYSTEM_IN_TEMPLATE.finditer(chat_template):
    text = match.group(1)
    if not any(c in text for c in "{}'\"+"):  # a literal, not a Jinja expression
      return text
  return None


class ChatTemplateMixin(ChatMLMixin):
  """Dispatches ``encode_chat`` on ``self.chat_format`` (see the module docstring).

  Subclasses set ``chat_format`` and the ids the format needs: ``im_start_id``/``im_end_id``
  (chatml), ``header_start_id``/``header_end_id``/``eot_id`` (llama3), ``bos_id``/``eos_id``
  (llama2).
  """

  chat_format: str = "chatml"

  def encode_chat(self, question, response=None, system=None):
    if self.chat_format == "chatml":
      return ChatMLMixin.encode_chat(self, question, response, system)
    system = self.default_system if system is None else system
    if self.chat_format == "llama3":
      return self._llama3_chat(question, response, system)
    return self._llama2_chat(question, response, system)

  def _llama3_chat(self, question, response, system):
    def header(role):
      return [self.header_start_id, *self.encode(role), self.header_end_id, *self.encode("\n\n")]

    prompt = [self.bos_id] if self.add_bos and self.bos_id is not None else []
    if system:
      prompt += [*header("system"), *self.encode(system), self.eot_id]
    prompt += [*header("user"), *self.encode(question), self.eot_id, *header("assistant")]
    resp = [] if response is None else [*self.encode(response), self.eot_id]
    return prompt, resp

  def _llama2_chat(self, question, response, system):
    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    prompt = [self.bos_id] if self.add_bos and self.bos_id is not None else []
    prompt += self.encode(f"[INST] {sys_block}{question.strip()} [/INST]")
    resp = [] if response is None else [*self.encode(response.strip()), self.eos_id]
    return prompt, resp


# ----------------------------------------------------------------------------- special tokens


def _token_text(value: Any) -> str | None:
  """A special token in ``tokenizer_config.json`` is a string or ``{"content": ...}``."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_tokenizer_config(directory: pathlib.Path) -> dict:
  path = directory / "tokenizer_config.json"
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e


class _SpecialIds:
  """Resolves bos/eos/pad/stop ids and the chat format from a vocabulary and an optional config."""

  def __init__(self, token_to_id, config: Mapping[str, Any], source: str):
    self._id = token_to_id

    def find(*names):
      for n in names:
        if n and self._id(n) is not None:
          return self._id(n)
      return None

    self.chat_format = chat_format_for_vocab(lambda t: self._id(t) is not None)
    declared_eos = find(_token_text(config.get("eos_token")))
    declared_bos = find(_token_text(config.get("bos_token")))
    if self.chat_format == "chatml":
      self.im_start_id, self.im_end_id = find("<|im_start|>"), find("<|im_end|>")
      self.eos_id = self.im_end_id
    elif self.chat_format == "llama3":
      self.header_start_id = find("<|start_header_id|>")
      self.header_end_id = find("<|end_header_id|>")
      self.eot_id = self.eos_id = find("<|eot_id|>")
    else:
      self.eos_id = declared_eos if declared_eos is not None else find("</s>", "<|endoftext|>")
      if self.eos_id is None:
        raise ValueError(f"{source}: no end-of-sequence token (eos_token, '</s>' or "
                         "'<|endoftext|>') in the vocabulary")
    self.bos_id = declared_bos if declared_bos is not None else find("<s>", "<|begin_of_text|>")
    pad = find(_token_text(config.get("pad_token")))
    self.pad_id = pad if pad is not None else self.eos_id
    stops = [self.eos_id, declared_eos, find("<|endoftext|>"), find("</s>")]
    if self.chat_format == "llama3":
      stops.append(find("<|end_of_text|>"))
    self.stop_ids = tuple(dict.fromkeys(s for s in stops if s is not None))
    default_add_bos = self.chat_format != "chatml" and self.bos_id is not None
    self.add_bos = bool(config.get("add_bos_token", default_add_bos)) and self.bos_id is not None
    self.default_system = default_system_from_template(config.get("chat_template"))

  def install(self, tok) -> None:
    for name, value in vars(self).items():
      if not name.startswith("_"):
        setattr(tok, name, value)


# ----------------------------------------------------------------------------- tokenizers library


class HFTokenizer(ChatTemplateMixin):
  """A ``tokenizers.Tokenizer`` (byte-level BPE, or anything a ``tokenizer.json`` describes).

  Args:
    tok: the ``tokenizers.Tokenizer``.
    config: the contents of ``tokenizer_config.json`` (special tokens, ``add_bos_token``,
      ``chat_template``), or an equivalent dict; may be empty.
    source: where the tokenizer came from, for error messages.
  """

  def __init__(self, tok, config: Mapping[str, Any] | None = None, source: str = "tokenizer"):
    self._tok = tok
    # Added special tokens in user text stay text: specials only ever enter as ids.
    self._tok.encode_special_tokens = True
    self.config = dict(config or {})
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    _SpecialIds(tok.token_to_id, self.config, source).install(self)

  @property
  def backend(self):
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, directory: PathLike) -> list[pathlib.Path]:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2),
                                                     encoding="utf-8")
    return [directory / "tokenizer.json", directory / "tokenizer_config.json"]


def from_tokenizer_json(path: PathLike, config: Mapping[str, Any] | None = None) -> HFTokenizer:
  """Loads a ``tokenizer.json``; a sibling ``tokenizer_config.json`` is read when ``config`` is None."""
  from tokenizers import Tokenizer as _Tok

  path = pathlib.Path(path)
  if config is None:
    config = _read_tokenizer_config(path.parent)
  try:
    tok = _Tok.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception with the parse error
    raise ValueError(f"{path}: cannot be read as a tokenizer.json: {e}") from e
  return HFTokenizer(tok, config, source=str(path))


_GGUF_PRE_TOKENIZERS = ("smollm", "gpt-2", "gpt2", "starcoder")


def bpe_from_gguf_metadata(meta: Mapping[str, Any], source: str = "gguf") -> HFTokenizer:
  """Builds the byte-level BPE stored in a GGUF file's metadata with ``tokenizers``.

  ``meta`` maps GGUF keys to decoded values (as ``read_gguf_metadata`` in ``load.py`` returns):
  ``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` / ``pre`` and the special-token ids.
  Tokens of type 3 (control) become special added tokens. The pre-tokenizer follows llama.cpp's
  ``pre`` name: ``smollm`` and ``starcoder`` split every digit on its own and then apply the GPT-2
  byte-level regex; ``gpt-2`` applies only the byte-level regex. Other pre-tokenizers (e.g. Llama 3's,
  Qwen2's) are refused rather than guessed: load those models' ``tokenizer.json`` instead.
  """
  from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers

  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') "
                     "can be rebuilt from GGUF metadata (use the model's tokenizer.json or .model)")
  pre = meta.get("tokenizer.ggml.pre", "gpt-2")
  if pre not in _GGUF_PRE_TOKENIZERS:
    raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (known: "
                     f"{', '.join(_GGUF_PRE_TOKENIZERS)}); use the model's tokenizer.json")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = []
  for row, m in enumerate(meta["tokenizer.ggml.merges"]):
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{source}: tokenizer.ggml.merges[{row}] = {m!r} is not 'left right'")
    merges.append((parts[0], parts[1]))
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = _Tok(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                        fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if pre in ("smollm", "starcoder"):
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  # Control tokens (type 3) and user-defined ones (type 4) match as whole tokens; only control
  # tokens are "special" (skipped when decoding, never parsed from user text).
  added = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
           for i in range(len(tokens)) if types[i] in (3, 4)]
  tok.add_tokens(added)
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(f"{source}: rebuilt vocabulary has {tok.get_vocab_size()} entries, GGUF "
                     f"metadata {len(tokens)} (duplicate tokens?)")

  def name_of(key):
    i = meta.get(key)
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  config = {"bos_token": name_of("tokenizer.ggml.bos_token_id"),
            "eos_token": name_of("tokenizer.ggml.eos_token_id"),
            "pad_token": name_of("tokenizer.ggml.padding_token_id"),
            "unk_token": name_of("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "chat_template": meta.get("tokenizer.chat_template")}
  return HFTokenizer(tok, {k: v for k, v in config.items() if v is not None}, source=source)


# ----------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(ChatTemplateMixin):
  """A SentencePiece ``.model`` (Llama 2, Mistral, Gemma-style tokenizers).

  ``encode`` never adds bos/eos and never parses control symbols out of text. Note that
  SentencePiece does parse *user-defined* symbols out of text: a model whose ChatML tokens are
  user-defined rather than control symbols would match ``<|im_end|>`` typed by a user.

  Args:
    path: the ``.model`` file.
    config: optional ``tokenizer_config.json`` contents (special tokens, ``add_bos_token``,
      ``chat_template``); read from the model's directory when None.
  """

  def __init__(self, path: PathLike, config: Mapping[str, Any] | None = None):
    import sentencepiece as spm

    self.path = pathlib.Path(path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(str(self.path))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{self.path}: cannot be read as a SentencePiece model: {e}") from e
    self.config = dict(_read_tokenizer_config(self.path.parent) if config is None else config)
    self.vocab_size = self._sp.get_piece_size()
    spec = dict(self.config)
    for key, getter in (("bos_token", self._sp.bos_id), ("eos_token", self._sp.eos_id),
                        ("pad_token", self._sp.pad_id)):
      if key not in spec and getter() >= 0:
        spec[key] = self._sp.id_to_piece(getter())
    _SpecialIds(self._piece_id, spec, str(self.path)).install(self)

  def _piece_id(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def save(self, directory: PathLike) -> list[pathlib.Path]:
    """Copies ``tokenizer.model`` and writes ``tokenizer_config.json`` into ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if self.path.resolve() != (directory / "tokenizer.model").resolve():
      shutil.copyfile(self.path, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2),
                                                     encoding="utf-8")
    return [directory / "tokenizer.model", directory / "tokenizer_config.json"]


# ----------------------------------------------------------------------------- dispatch


def load_tokenizer(path: PathLike) -> HFTokenizer | SentencePieceTokenizer:
  """Loads a tokenizer from a directory (``tokenizer.json`` preferred, else ``tokenizer.model``),
  a ``tokenizer.json``, a SentencePiece ``.model`` file, or a ``.gguf`` file's metadata."""
  path = pathlib.Path(path)
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return from_tokenizer_json(path / "tokenizer.json")
    if (path / "tokenizer.model").is_file():
      return SentencePieceTokenizer(path / "tokenizer.model")
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such tokenizer file")
  if path.suffix == ".json":
    return from_tokenizer_json(path)
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if path.suffix == ".gguf":
    from bilevel_jax.model import load  # the GGUF reader lives with the model loader

    return bpe_from_gguf_metadata(load.read_gguf_metadata(path), source=str(path))
  raise ValueError(f"{path}: unknown tokenizer file type (expected a directory, tokenizer.json, "
                   ".model or .gguf)")

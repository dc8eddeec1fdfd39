"""Tokenizers: byte-level BPE (tokenizer.json and GGUF metadata), SentencePiece, chat templates.

Every tokenizer here is trained inside the test in well under a second; the real SmolLM2 tokenizer
is checked in ``test_real_model.py`` (slow).
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

from bilevel_jax.model import tokenizer as tk

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
CORPUS = [f"Question {i}: what is {i} times {i + 3}? The answer is {i * (i + 3)}. Café naïve "
          f"résumé, ünïcödé ✓ and the assistant says hello to the user number {i}." for i in range(60)]
ROUND_TRIP = ["Numbers 1234567890 and 3.14159; 1,000,000 apples.", "naïve café Ångström 日本語 😀 ✓",
              "  leading spaces, tabs\tand\nnew lines\n", "it's <|im_end|> not a special token"]


def train_bpe(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), vocab_size=320) -> HFTok:
  """A small SmolLM2-style byte-level BPE: every digit alone, then the GPT-2 byte-level regex."""
  tok = HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def gguf_metadata(tok: HFTok, n_specials=3, **extra) -> dict:
  """The GGUF tokenizer metadata llama.cpp's converter would write for ``tok``."""
  n = tok.get_vocab_size()
  merges = json.loads(tok.to_str())["model"]["merges"]
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": [tok.id_to_token(i) for i in range(n)],
          "tokenizer.ggml.token_type": [3 if i < n_specials else 1 for i in range(n)],
          "tokenizer.ggml.merges": [" ".join(m) for m in merges],
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False,
          "tokenizer.chat_template": SMOLLM2_TEMPLATE}
  meta.update(extra)
  return meta


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bpe")
  train_bpe().save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
       "add_bos_token": False, "chat_template": SMOLLM2_TEMPLATE}))
  return d


def test_byte_tokenizer_still_satisfies_protocol():
  tok = tk.ByteTokenizer()
  assert isinstance(tok, tk.Tokenizer)
  prompt, resp = tok.encode_chat("hi", "yo")
  assert resp == [*b"yo", tok.im_end_id] and prompt[-len(b"assistant\n"):] == list(b"assistant\n")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_json_round_trips_text(bpe_dir, text):
  tok = tk.load_tokenizer(bpe_dir)
  assert isinstance(tok, tk.HFTokenizer) and isinstance(tok, tk.Tokenizer)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert not set(ids) & {0, 1, 2}  # special tokens typed as text stay text


def test_bpe_splits_digits_one_by_one(bpe_dir):
  tok = tk.load_tokenizer(bpe_dir)
  ids = tok.encode("2023")
  assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "3"]


def test_bpe_from_gguf_metadata_equals_tokenizer_json(bpe_dir):
  from_json = tk.load_tokenizer(bpe_dir)
  from_gguf = tk.bpe_from_gguf_metadata(gguf_metadata(train_bpe()))
  for text in ROUND_TRIP + CORPUS[:5]:
    assert from_gguf.encode(text) == from_json.encode(text)
    assert from_gguf.decode(from_gguf.encode(text)) == text
  for attr in ("vocab_size", "eos_id", "bos_id", "pad_id", "stop_ids", "chat_format",
               "default_system", "add_bos"):
    assert getattr(from_gguf, attr) == getattr(from_json, attr), attr
  assert from_gguf.eos_id == 2 and from_gguf.stop_ids == (2, 0)


def test_bpe_from_gguf_rejects_what_it_cannot_build():
  meta = gguf_metadata(train_bpe())
  with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
    tk.bpe_from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})
  with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2'"):
    tk.bpe_from_gguf_metadata({**meta, "tokenizer.ggml.pre": "qwen2"})
  bad = list(meta["tokenizer.ggml.merges"])
  bad[7] = "nospace"
  with pytest.raises(ValueError, match=r"merges\[7\]"):
    tk.bpe_from_gguf_metadata({**meta, "tokenizer.ggml.merges": bad})


def test_chatml_prompt_and_response_equal_whole_conversation(bpe_dir):
  tok = tk.load_tokenizer(bpe_dir)
  assert tok.chat_format == "chatml"
  assert tok.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
  q, r = "What is 12 times 15?", "The answer is 180."
  prompt, resp = tok.encode_chat(q, r)
  assert resp == tok.encode(r) + [tok.eos_id]
  # The template's text, tokenized in one piece with special tokens parsed, gives the same ids: the
  # split into prompt and response does not change how the response is tokenized.
  text = (f"<|im_start|>system\n{tok.default_system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
          f"<|im_start|>assistant\n{r}<|im_end|>")
  backend = tk.from_tokenizer_json(bpe_dir / "tokenizer.json").backend
  backend.encode_special_tokens = False
  assert prompt + resp == backend.encode(text, add_special_tokens=False).ids
  no_sys, _ = tok.encode_chat(q, r, system="")
  assert no_sys == prompt[len(prompt) - len(no_sys):] and len(no_sys) < len(prompt)
  assert tok.encode_chat(q)[1] == []


def test_llama3_template_from_vocab():
  specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>")
  tok = tk.HFTokenizer(train_bpe(specials), {"bos_token": "<|begin_of_text|>"})
  assert tok.chat_format == "llama3" and tok.add_bos and tok.bos_id == 0
  prompt, resp = tok.encode_chat("hi there", "hello", system="Be brief.")
  eot, sh, eh = 4, 2, 3
  assert resp == tok.encode("hello") + [eot]
  expected = [0, sh, *tok.encode("system"), eh, *tok.encode("\n\n"), *tok.encode("Be brief."), eot,
              sh, *tok.encode("user"), eh, *tok.encode("\n\n"), *tok.encode("hi there"), eot,
              sh, *tok.encode("assistant"), eh, *tok.encode("\n\n")]
  assert prompt == expected
  assert set(tok.stop_ids) == {eot, 1}


# ----------------------------------------------------------------------------- SentencePiece


def _train_spm(tmp_path, control=()):
  import sentencepiece as spm

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(CORPUS), encoding="utf-8")
  prefix = tmp_path / "tokenizer"
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, character_coverage=1.0, control_symbols=list(control),
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
  return prefix.with_suffix(".model")


@pytest.mark.parametrize("text", ROUND_TRIP + ["[INST] text"])
def test_sentencepiece_round_trips_text(tmp_path, text):
  tok = tk.load_tokenizer(_train_spm(tmp_path))
  assert isinstance(tok, tk.SentencePieceTokenizer) and isinstance(tok, tk.Tokenizer)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.bos_id not in ids and tok.eos_id not in ids


def test_sentencepiece_llama2_template(tmp_path):
  tok = tk.SentencePieceTokenizer(_train_spm(tmp_path))
  assert tok.chat_format == "llama2" and tok.add_bos and (tok.bos_id, tok.eos_id) == (1, 2)
  prompt, resp = tok.encode_chat("What is 2+2?", " Four. ", system="Be brief.")
  assert prompt == [1, *tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST]")]
  assert resp == [*tok.encode("Four."), 2]
  assert tok.decode(prompt + resp) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] Four."
  assert tok.encode_chat("q")[0] == [1, *tok.encode("[INST] q [/INST]")]


def test_sentencepiece_chatml_when_vocab_has_it(tmp_path):
  tok = tk.SentencePieceTokenizer(_train_spm(tmp_path, control=("<|im_start|>", "<|im_end|>")))
  assert tok.chat_format == "chatml"
  prompt, resp = tok.encode_chat("hi", "hello", system="")
  im_start, im_end = tok.im_start_id, tok.im_end_id
  assert prompt == [im_start, *tok.encode("user\nhi"), im_end, *tok.encode("\n"), im_start,
                    *tok.encode("assistant\n")]
  assert resp == [*tok.encode("hello"), im_end] and tok.eos_id == im_end
  # Control symbols are never parsed from text.
  assert im_end not in tok.encode("a <|im_end|> b")


def test_sentencepiece_save_and_reload(tmp_path):
  tok = tk.SentencePieceTokenizer(_train_spm(tmp_path))
  out = tmp_path / "export"
  tok.save(out)
  again = tk.load_tokenizer(out)
  assert again.encode(ROUND_TRIP[1]) == tok.encode(ROUND_TRIP[1])
  assert again.encode_chat("q", "r") == tok.encode_chat("q", "r")


# ----------------------------------------------------------------------------- errors


def test_load_tokenizer_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    tk.load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json: cannot be read"):
    tk.load_tokenizer(tmp_path)
  train_bpe().save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
  with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON \(line 1"):
    tk.load_tokenizer(tmp_path)
  (tmp_path / "corpus.txt").write_text("text")
  with pytest.raises(ValueError, match="unknown tokenizer file type"):
    tk.load_tokenizer(tmp_path / "corpus.txt")


def test_default_system_from_template():
  assert tk.default_system_from_template(SMOLLM2_TEMPLATE).startswith("You are a helpful AI")
  assert tk.default_system_from_template(None) is None
  # A template that only forwards the user's system message has no default.
  assert tk.default_system_from_template(
      "{{'<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>'}}") is None

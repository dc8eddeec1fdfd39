"""Loaders and export: HF safetensors directories (Llama, Qwen2-style bias, untied, sharded, bf16)
and GGUF (a tiny llama.cpp-layout file written here), all with tiny random models."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bilevel_jax.model import llama, load, lora
from test_tokenizer import gguf_metadata, train_bpe  # tests/ is on sys.path (rootdir conftest)

TOKENS = jnp.asarray([[5, 17, 42, 3, 99, 7, 64, 1], [8, 8, 250, 31, 0, 12, 77, 300]], jnp.int32)


def _tiny(**kw):
  return llama.tiny_config(vocab_size=320, **kw)


def _random_like(init_fn, seed, scale=0.2):
  """Random arrays in the structure ``init_fn(key)`` returns, drawn with NumPy: eager JAX random
  ops compile one by one, which costs seconds on a busy 2-core machine."""
  shapes = jax.eval_shape(init_fn, jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray((rng.normal(size=s.shape) * scale).astype(s.dtype)),
                      shapes)


def _random_params(cfg, seed):
  return _random_like(lambda k: llama.init_params(cfg, k), seed)


def _write_hf_checkpoint(path, cfg, params, model_type):
  """An HF checkpoint written independently of ``load.py``: HF names, (out, in) matrices."""
  names = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
           "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
           "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
           "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
           "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias",
           "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}
  state = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"])}
  for ours, stacked in params["layers"].items():
    for i in range(cfg.n_layers):
      x = np.asarray(stacked[i])
      state[f"model.layers.{i}.{names[ours]}"] = np.ascontiguousarray(x.T if x.ndim == 2 else x)
  if not cfg.tie_embeddings:
    state["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
  path.mkdir(parents=True, exist_ok=True)
  save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
  config = {"model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings}
  (path / "config.json").write_text(json.dumps(config))
  train_bpe().save(str(path / "tokenizer.json"))
  return state


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_apply = jax.jit(llama.apply, static_argnames=("cfg", "lora_scale"))


def _logits(params, cfg, **kw):
  return np.asarray(_apply(params, cfg, TOKENS, **kw)[0])


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}), ("qwen2", {"qkv_bias": True, "tie_embeddings": False}),
    ("mistral", {"tie_embeddings": False})])
def test_hf_round_trip_is_bitwise(tmp_path, model_type, overrides):
  cfg = _tiny(**overrides)
  params = _random_params(cfg, 0)
  written = _write_hf_checkpoint(tmp_path / "in", cfg, params, model_type)

  cfg2, params2, tok = load.load_safetensors_dir(tmp_path / "in")
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)
  np.testing.assert_array_equal(_logits(params2, cfg2), _logits(params, cfg))
  assert tok.chat_format == "chatml" and tok.decode(tok.encode("héllo 42")) == "héllo 42"

  load.save_safetensors_dir(tmp_path / "out", cfg2, params2, tokenizer=tok)
  exported = load_file(str(tmp_path / "out" / "model.safetensors"))
  assert exported.keys() == written.keys()
  for name, x in written.items():
    assert exported[name].dtype == x.dtype
    np.testing.assert_array_equal(exported[name], x, err_msg=name)
  cfg3, params3, tok3 = load.load_safetensors_dir(tmp_path / "out")
  assert cfg3 == cfg
  _assert_trees_equal(params3, params)
  assert tok3.encode_chat("q 1", "r 2") == tok.encode_chat("q 1", "r 2")
  hf = json.loads((tmp_path / "out" / "config.json").read_text())
  assert hf["model_type"] == ("qwen2" if cfg.qkv_bias else "llama")


def test_sharded_and_bf16_export(tmp_path):
  cfg = _tiny(tie_embeddings=False)
  params = _random_params(cfg, 1)
  load.save_safetensors_dir(tmp_path / "sharded", cfg, params, max_shard_bytes=40_000,
                            tokenizer_files=[_bpe_file(tmp_path)])
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  _, params2, _ = load.load_safetensors_dir(tmp_path / "sharded")
  _assert_trees_equal(params2, params)

  load.save_safetensors_dir(tmp_path / "bf16", cfg, params, dtype=jnp.bfloat16,
                            tokenizer_files=[_bpe_file(tmp_path)])
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  cfg_b, params_b, _ = load.load_safetensors_dir(tmp_path / "bf16", dtype=jnp.bfloat16)
  assert cfg_b.dtype == "bfloat16"
  _assert_trees_equal(params_b, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def _bpe_file(tmp_path):
  path = tmp_path / "tokenizer.json"
  if not path.exists():
    train_bpe().save(str(path))
  return path


def test_save_refuses_to_mix_checkpoints(tmp_path):
  cfg = _tiny()
  params = _random_params(cfg, 2)
  load.save_safetensors_dir(tmp_path, cfg, params, max_shard_bytes=40_000)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    load.save_safetensors_dir(tmp_path, cfg, params)
  load.save_safetensors_dir(tmp_path, cfg, params, overwrite=True, tokenizer_files=[_bpe_file(tmp_path)])
  assert not (tmp_path / "model.safetensors.index.json").exists()
  _assert_trees_equal(load.load_safetensors_dir(tmp_path)[1], params)


def test_bad_checkpoints_name_file_and_field(tmp_path):
  cfg = _tiny()
  params = _random_params(cfg, 3)
  _write_hf_checkpoint(tmp_path, cfg, params, "llama")
  config = json.loads((tmp_path / "config.json").read_text())

  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
  with pytest.raises(ValueError, match=r"config.json: field 'model_type' is 'gpt_neox'"):
    load.load_safetensors_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                    if k != "hidden_size"}))
  with pytest.raises(ValueError, match=r"config.json: field 'hidden_size' is missing"):
    load.load_safetensors_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3"}}))
  with pytest.raises(ValueError, match="rope_scaling"):
    load.load_safetensors_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
  with pytest.raises(KeyError, match=r"'layers.2.input_layernorm.weight' is missing"):
    load.load_safetensors_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
  with pytest.raises(ValueError, match=r"'layers.0.mlp.gate_proj.weight' has shape \(64, 32\)"):
    load.load_safetensors_dir(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
  with pytest.raises(ValueError, match="tensor.s. this model does not use"):
    load.load_safetensors_dir(tmp_path)


def test_merge_lora_equals_adapter_forward():
  cfg = _tiny()
  params = _random_params(cfg, 4)
  spec = lora.TrainableSpec(kind="lora", lora_rank=4, lora_alpha=8.0)
  # Both factors random (init_lora starts b at zero, a no-op adapter).
  adapters = _random_like(lambda k: lora.init_lora(cfg, spec, k), 5, scale=0.1)
  with_adapter = _logits(params, cfg, lora=adapters, lora_scale=spec.lora_scale)
  merged = load.merge_lora(params, adapters, spec.lora_scale)
  assert not np.allclose(_logits(merged, cfg), _logits(params, cfg), atol=1e-3)
  np.testing.assert_allclose(_logits(merged, cfg), with_adapter, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GGUF


def _permute(w, n_head):
  """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute), written out here."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_makes_rotate_half_equal_adjacent_pairs():
  """HF rotate_half RoPE on un-permuted weights == llama.cpp's adjacent-pair RoPE on permuted ones."""
  rng = np.random.default_rng(0)
  n_head, hd, d, t = 3, 8, 16, 5
  w_hf = rng.normal(size=(n_head * hd, d)).astype(np.float32)
  w_gguf = _permute(w_hf, n_head)
  np.testing.assert_array_equal(load.unpermute_qk(w_gguf, n_head), w_hf)
  x = rng.normal(size=(1, t, d)).astype(np.float32)
  pos = jnp.arange(t)[None]
  hf = llama.rope(jnp.asarray(x @ w_hf.T).reshape(1, t, n_head, hd), pos, 10000.0)
  y = (x @ w_gguf.T).reshape(1, t, n_head, hd)
  ang = np.arange(t)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  adj = np.empty_like(y)
  adj[..., 0::2] = y[..., 0::2] * cos - y[..., 1::2] * sin
  adj[..., 1::2] = y[..., 0::2] * sin + y[..., 1::2] * cos
  # Same rotation, head dims in a different order: HF's [re..., im...] vs llama.cpp's interleaved.
  order = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
  np.testing.assert_allclose(np.asarray(hf), adj[..., order], rtol=1e-5, atol=1e-5)


def _write_gguf(path, cfg, params):
  import gguf

  w = gguf.GGUFWriter(str(path), arch="llama")
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_vocab_size(cfg.vocab_size)
  meta = gguf_metadata(train_bpe())
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(meta["tokenizer.ggml.tokens"])
  w.add_token_types(meta["tokenizer.ggml.token_type"])
  w.add_token_merges(meta["tokenizer.ggml.merges"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(meta["tokenizer.chat_template"])
  w.add_tensor("token_embd.weight", np.asarray(params["embed"]))
  w.add_tensor("output_norm.weight", np.asarray(params["final_norm"]))
  names = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
           "wo": "attn_output", "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up",
           "w_down": "ffn_down"}
  for i in range(cfg.n_layers):
    for ours, theirs in names.items():
      x = np.asarray(params["layers"][ours][i])
      x = np.ascontiguousarray(x.T) if x.ndim == 2 else x
      if ours in ("wq", "wk"):
        x = _permute(x, cfg.n_heads if ours == "wq" else cfg.n_kv_heads)
      w.add_tensor(f"blk.{i}.{theirs}.weight", x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_load_and_cache(tmp_path):
  cfg = _tiny(rope_theta=100000.0)
  params = _random_params(cfg, 7)
  _write_gguf(tmp_path / "tiny.gguf", cfg, params)
  cache = tmp_path / "cache"

  cfg1, params1, tok1 = load.load_gguf(tmp_path / "tiny.gguf", cache_dir=cache)
  assert cfg1 == cfg
  _assert_trees_equal(params1, params)
  np.testing.assert_array_equal(_logits(params1, cfg1), _logits(params, cfg))
  assert tok1.default_system.startswith("You are a helpful AI") and tok1.eos_id == 2
  (entry,) = cache.iterdir()
  assert entry.name.startswith("tiny-") and (entry / "model.safetensors").is_file()

  cfg2, params2, tok2 = load.load_gguf(tmp_path / "tiny.gguf", cache_dir=cache)  # from the cache
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)
  text = "Cached 2024: naïve ✓"
  assert tok2.encode(text) == tok1.encode(text) and tok2.encode_chat("a", "b") == tok1.encode_chat("a", "b")
  assert tok2.default_system == tok1.default_system
  tok3 = load.load_gguf_tokenizer(tmp_path / "tiny.gguf", cache_dir=cache)  # cached tokenizer only
  uncached = load.load_gguf_tokenizer(tmp_path / "tiny.gguf", cache_dir=tmp_path / "empty")
  for t in (tok3, uncached):
    assert t.encode(text) == tok1.encode(text) and t.encode_chat("a", "b") == tok1.encode_chat("a", "b")

  cfg3, params3, _ = load.load_gguf(tmp_path / "tiny.gguf", dtype=jnp.bfloat16, use_cache=False)
  assert cfg3.dtype == "bfloat16" and params3["embed"].dtype == jnp.bfloat16


def test_gguf_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such GGUF file"):
    load.load_gguf(tmp_path / "missing.gguf")
  meta = {"general.architecture": "gptj"}
  with pytest.raises(ValueError, match="general.architecture is 'gptj'"):
    load.config_from_gguf(meta, [])
  with pytest.raises(ValueError, match="'llama.embedding_length' is missing"):
    load.config_from_gguf({"general.architecture": "llama"}, [])

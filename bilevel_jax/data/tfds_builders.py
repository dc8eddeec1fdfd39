"""The pools as TFDS datasets (``array_record`` files), read back with ``tfds.data_source``.

One :class:`BilevelPool` builder with a config per embedded pool (``bilevel_pool/safety_matched``,
...). Non-default sizes or a user's own records get a config named by a hash of their content.
Reading needs no TensorFlow: ``tfds.data_source`` returns a random-access source of dicts that
grain can index.

TFDS shuffles records when it writes them, so each record carries ``index`` (its row in the
weight vector: pool records sorted by ``example_id``, numbered from 0; the same rule in the other
splits), and the builder writes that mapping to ``weight_index.tsv`` beside the data.

The default data directory is ``~/.cache/bilevel_jax/tfds`` (or ``$BILEVEL_JAX_TFDS_DIR``).
Building a pool takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bilevel_jax.data.records import SPLITS, Record, assign_indices
from bilevel_jax.data.sources import POOL_NAMES, PoolParams, build_pool

TEXT_FIELDS = ("example_id", "question", "response", "source", "label", "split", "meta")


def default_data_dir() -> str:
  return os.environ.get("BILEVEL_JAX_TFDS_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "bilevel_jax", "tfds"))


@dataclasses.dataclass(eq=False)
class PoolConfig(tfds.core.BuilderConfig):
  """``pool``: which embedded pool; ``params``: JSON of non-default :class:`PoolParams`."""

  pool: str = ""
  params: str = ""


class BilevelPool(tfds.core.GeneratorBasedBuilder):
  """An SFT pool with ``pool``, ``validation`` and ``test`` splits.

  Args (besides TFDS's ``data_dir``, ``file_format``...):
    records: ``{split: [Record]}`` to store instead of an embedded pool (with a ``custom_<hash>``
      config made by :func:`records_config`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: embedded pools from PyPI data packages."}
  BUILDER_CONFIGS = [PoolConfig(name=n, pool=n, description=f"embedded pool {n}")
                     for n in POOL_NAMES]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks the file up through importlib.resources, which fails for an editable install
    # (a namespace-style path); the file is simply this one.
    return epath.Path(__file__)

  def __init__(self, *, records: Mapping[str, Sequence[Record]] | None = None, **kwargs):
    self._records = records
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # A builder that is not in its own package must build DatasetInfo itself (DESIGN.md s.7).
    features = {f: tfds.features.Text() for f in TEXT_FIELDS}
    features["index"] = np.int32
    return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n")[0],
                                 features=tfds.features.FeaturesDict(features))

  def _splits(self) -> dict[str, list[Record]]:
    if self._records is not None:
      return {s: list(self._records.get(s, [])) for s in SPLITS}
    cfg = self.builder_config
    params = PoolParams(**json.loads(cfg.params)) if cfg.params else PoolParams()
    if "match_tokens" in (json.loads(cfg.params) if cfg.params else {}):
      params = dataclasses.replace(params, match_tokens=tuple(params.match_tokens))
    return build_pool(cfg.pool, params).splits

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded: the data come from installed packages
    splits = self._splits()
    self._index_maps = {s: assign_indices(recs) for s, recs in splits.items()}
    return {s: self._generate_examples(recs, self._index_maps[s]) for s, recs in splits.items()}

  def _generate_examples(self, records, index_map):
    for r in records:
      yield r.example_id, {"example_id": r.example_id, "question": r.question,
                           "response": r.response, "source": r.source, "label": r.label,
                           "split": r.split, "meta": json.dumps(dict(r.meta), sort_keys=True),
                           "index": index_map[r.example_id]}


def params_config(pool: str, params: PoolParams) -> PoolConfig:
  """The config of an embedded pool with non-default ``params`` (name ``<pool>_<hash>``)."""
  if params == PoolParams():
    return next(c for c in BilevelPool.BUILDER_CONFIGS if c.name == pool)
  text = json.dumps(dataclasses.asdict(params), sort_keys=True)
  h = hashlib.sha256(f"{pool}:{text}".encode()).hexdigest()[:12]
  return PoolConfig(name=f"{pool}_{h}", pool=pool, params=text,
                    description=f"embedded pool {pool} with params {text}")


def records_config(records: Mapping[str, Sequence[Record]], name: str = "custom") -> PoolConfig:
  """A config for user records, named by a hash of their content (so a changed file rebuilds)."""
  h = hashlib.sha256()
  for s in SPLITS:
    for r in sorted(records.get(s, []), key=lambda r: r.example_id):
      h.update(json.dumps(r.to_json(), sort_keys=True).encode())
  return PoolConfig(name=f"{name}_{h.hexdigest()[:12]}", description="user records")


def prepare(pool: str | None = None, *, params: PoolParams | None = None,
            records: Mapping[str, Sequence[Record]] | None = None,
            data_dir: str | None = None, quiet: bool = True) -> BilevelPool:
  """Builds (once) and returns the TFDS builder of an embedded pool or of user ``records``.

  Args:
    pool: an embedded pool name (:data:`POOL_NAMES`), or None with ``records``.
    params: non-default sizes/seed of the embedded pool.
    records: ``{split: [Record]}`` of the user's own data.
    data_dir: where TFDS writes (default :func:`default_data_dir`).
    quiet: hide TFDS's progress bars.
  """
  data_dir = data_dir or default_data_dir()
  if records is not None:
    config = records_config(records)
  else:
    if pool not in POOL_NAMES:
      raise ValueError(f"unknown pool {pool!r} (available: {', '.join(POOL_NAMES)})")
    config = params_config(pool, params or PoolParams())
  builder = BilevelPool(data_dir=data_dir, config=config, records=records)
  if not builder.is_prepared():
    if quiet:
      tfds.disable_progress_bar()
    builder.download_and_prepare()
    _write_index_maps(builder)
  return builder


def _write_index_maps(builder: BilevelPool):
  for split in SPLITS:
    src = builder.as_data_source(split=split)
    rows = sorted((int(ex["index"]), ex["example_id"].decode()) for ex in src)
    path = os.path.join(str(builder.data_path), f"weight_index.{split}.tsv")
    with open(path, "w", encoding="utf-8") as f:
      f.write("index\texample_id\n")
      f.writelines(f"{i}\t{e}\n" for i, e in rows)


def data_source(pool: str | None = None, split: str = "pool", **kwargs):
  """``tfds.data_source`` of one split (built first if needed); ``kwargs`` as :func:`prepare`.

  Default embedded pools are opened by name (``bilevel_pool/<pool>``); others through their
  builder. Elements are dicts of bytes and ``index``; see :func:`decode`.
  """
  builder = prepare(pool, **kwargs)
  if kwargs.get("records") is None and kwargs.get("params") in (None, PoolParams()):
    return tfds.data_source(f"bilevel_pool/{pool}", split=split,
                            data_dir=kwargs.get("data_dir") or default_data_dir())
  return builder.as_data_source(split=split)


def decode(example: Mapping) -> tuple[int, Record]:
  """``(index, Record)`` from a data-source element (bytes fields decoded as UTF-8)."""
  text = {f: (v.decode("utf-8") if isinstance(v, bytes) else str(v))
          for f, v in example.items() if f != "index"}
  text["meta"] = json.loads(text.get("meta") or "{}")
  return int(example["index"]), Record.from_json(text)

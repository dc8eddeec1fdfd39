"""metrics.jsonl truncation on resume, TensorBoard event encoding, NaN guard."""

import json

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bilevel_jax import metrics as M


def _event_class():
  """tensorflow.Event / Summary / Summary.Value built with protobuf itself: an independent decoder."""
  fdp = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="tft", syntax="proto3")
  F = descriptor_pb2.FieldDescriptorProto
  value = fdp.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
  summ = fdp.message_type.add(name="Summary")
  summ.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                 type_name=".tft.Value")
  ev = fdp.message_type.add(name="Event")
  ev.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
  ev.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
  ev.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  ev.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
               type_name=".tft.Summary")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tft.Event"))


def test_crc32c_known_vector():
  # The standard CRC-32C check value.
  assert M.crc32c(b"123456789") == 0xE3069283


def test_event_file_decodes_with_protobuf(tmp_path):
  w = M.EventFileWriter(tmp_path)
  w.scalars(3, {"loss": 1.25, "select/auroc": 0.5})
  w.scalars(2**40, {"x": -2.0})
  w.close()
  Event = _event_class()
  recs = [Event.FromString(p) for p in M.read_tfrecords(w.path)]
  assert recs[0].file_version == "brain.Event:2"
  assert recs[1].step == 3
  assert {v.tag: v.simple_value for v in recs[1].summary.value} == {"loss": 1.25, "select/auroc": 0.5}
  assert recs[2].step == 2**40 and recs[2].summary.value[0].simple_value == -2.0
  assert w.path.name.startswith("events.out.tfevents.")


def test_corrupted_record_is_detected(tmp_path):
  w = M.EventFileWriter(tmp_path)
  w.scalars(1, {"a": 1.0})
  w.close()
  data = bytearray(w.path.read_bytes())
  data[-6] ^= 0xFF
  w.path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="CRC"):
    M.read_tfrecords(w.path)


def test_jsonl_resume_drops_records_after_checkpoint(tmp_path):
  with M.MetricsLogger(tmp_path, tensorboard=False) as m:
    for s in range(1, 6):
      m.log(s, {"loss": np.float32(1.0 / s), "vec": np.arange(2)})
  # A kill mid-write leaves a partial last line.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')
  with M.MetricsLogger(tmp_path, resume_step=3, tensorboard=False) as m:
    m.log(4, {"loss": float("nan")})
  recs = M.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in recs] == [1, 2, 3, 4]
  assert recs[1]["vec"] == [0, 1] and recs[3]["loss"] is None
  assert recs[2]["loss"] == pytest.approx(1 / 3)
  # A fresh (non-resumed) logger starts the file over.
  with M.MetricsLogger(tmp_path, tensorboard=False) as m:
    m.log(1, {"a": 1})
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_disabled_logger_writes_nothing(tmp_path):
  with M.MetricsLogger(tmp_path / "p1", enabled=False) as m:
    m.log(1, {"a": 1.0})
  assert not (tmp_path / "p1").exists()


def test_nonfinite_guard_counts_and_stops():
  g = M.NonFiniteGuard(max_count=2, what="select")
  assert g.update(1, True)
  assert not g.update(2, False)
  assert not g.update(3, False)
  with pytest.raises(M.TooManyNonFinite, match="max_nonfinite=2"):
    g.update(4, False)
  assert g.count == 3


def test_log_progress_prints_eta(capsys):
  bar = M.progress(4, "demo", interval=0.0)
  for _ in range(4):
    bar.update(1)
  bar.close()
  err = capsys.readouterr().err
  assert "demo: 4/4 (100%)" in err and "ETA" in err

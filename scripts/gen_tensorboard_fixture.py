"""TensorBoard's own event file writer on fixed scalars: the bytes qlorad's writer must match.

Usage: .venv/bin/python scripts/gen_tensorboard_fixture.py tests/fixtures/tensorboard

Writes `events.bin` (the event file, through tensorboard's EventFileWriter) and `scalars.json`
(what went in, and the versions). The clock is pinned so the file-version event is
reproducible, and the writer named in its source metadata is qlorad's, as qlorad writes it.
"""

import json
import os
import shutil
import sys
import tempfile
from unittest import mock

import google.protobuf
import tensorboard
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer import event_file_writer as efw

WALL = 1700000000.5
SCALARS = [
    # tag, step, value, wall time: a zero step and a zero value (proto3 leaves one out, the
    # oneof keeps the other), a negative value, a large step, a non-ASCII tag.
    ("train/loss", 0, 2.75, 1700000001.25),
    ("train/learning_rate", 1, 0.0002, 1700000001.5),
    ("train/grad_norm", 1, 0.0, 1700000001.75),
    ("eval/loss", 300, -1.5, 1700000002.0),
    ("train/loss", 123456789, 3.4028234663852886e38, 1700000003.0),
    ("évaluation/précision", 7, 0.125, 1700000004.0),
]


def main(out):
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp()
    real = event_pb2.SourceMetadata
    with mock.patch.object(efw.time, "time", return_value=WALL), mock.patch.object(
        efw.event_pb2, "SourceMetadata", lambda writer: real(writer="qlorad")
    ):
        w = efw.EventFileWriter(tmp)
    for tag, step, value, wall in SCALARS:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        w.add_event(event_pb2.Event(wall_time=wall, step=step, summary=summary))
    w.close()
    (name,) = os.listdir(tmp)
    shutil.copy(os.path.join(tmp, name), os.path.join(out, "events.bin"))
    meta = {
        "made_by": "scripts/gen_tensorboard_fixture.py",
        "tensorboard": tensorboard.__version__,
        "protobuf": google.protobuf.__version__,
        "file_version_wall_time": WALL,
        "scalars": [{"tag": t, "step": s, "value": v, "wall_time": w} for t, s, v, w in SCALARS],
    }
    with open(os.path.join(out, "scalars.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])

"""Read the history of an offline W&B run (`run-<id>.wandb`) for tests.

wandb 0.31 writes its transaction log from its Go core and ships no Python reader any more. The
file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each
record's payload one `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        parts.append(chunk)
        if kind in (1, 4):  # full, or last of a split record
            yield b"".join(parts)
            parts = []


def history(path: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} from every history record of the run file."""
    from wandb.proto import wandb_internal_pb2

    out: dict[str, dict[int, float]] = {}
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        step = record.history.step.num
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if key.startswith("_"):
                continue  # W&B's own _step, _runtime, _timestamp
            out.setdefault(key, {})[step] = json.loads(item.value_json)
    return out

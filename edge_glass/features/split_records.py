"""A split directory's bookkeeping, shared by extraction and the store converter.

    <split>/extraction.json      the settings the split is made with (written first)
    <split>/shard-NNNNNN.json    a shard's record, written after its files: marks it complete
    <split>/manifest.json        written last, when every shard is complete

A writer refuses a directory made with other settings, clears only what it owns, and resumes by
skipping complete shards.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_glass import __version__
from edge_glass.features.manifest import EXTRACTION, FORMAT_VERSION, MANIFEST, differences, read_json, shard_stem
from edge_glass.features.stats import RunningMoments
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic


def refuse_mismatch(out: Path, settings: dict, overwrite: bool) -> None:
    """Every rank checks (read-only), so a refusal stops all of them, not only rank 0."""
    record = out / EXTRACTION
    if record.is_file() and not overwrite:
        old = read_json(record)
        if old.get("fingerprint") != settings["fingerprint"]:
            changed = ", ".join(f"encoders.{d}" for d in differences(old.get("encoders"), settings["encoders"]))
            if not changed:
                changed = ", ".join(k for k in ("token_dtype", "pooled_dtype", "quantization", "format_version")
                                    if old.get(k) != settings.get(k)) or "store settings"
            raise UserError(
                f"{out} holds features of other encoders or settings (store fingerprint {old.get('fingerprint')}, "
                f"this config {settings['fingerprint']}; differs in {changed}); re-run with --overwrite to replace them"
            )


def prepare_split_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """Rank 0, before any rank writes: clear for --overwrite, drop stale temporaries, record settings."""
    record = out / EXTRACTION
    if out.is_dir():
        for p in out.iterdir():
            # Temporaries are left only by killed runs; nothing is writing while ranks wait at
            # the barrier after this. With --overwrite, remove only what extraction writes,
            # never a user's stray files.
            ours = p.name.startswith(("shard-", ".tmp-")) or p.name in (MANIFEST, EXTRACTION)
            if p.name.startswith(".tmp-") or (overwrite and ours):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not record.is_file() or overwrite:
        write_text_atomic(record, json.dumps(settings, indent=1, sort_keys=True))


def shard_complete(out: Path, index: int, formats: list[str]) -> bool:
    record = out / f"{shard_stem(index)}.json"
    if not record.is_file():
        return False
    have = read_json(record)["files"]
    return all(fmt in have and (out / have[fmt]["file"]).is_file() for fmt in formats)


def write_manifest(out: Path, split: str, num_shards: int, settings: dict, source: dict) -> dict:
    """The split's manifest from its shard records: formats, fields, counts, merged statistics,
    and the samples left out by reason; returns it."""
    records = []
    for i in range(num_shards):
        path = out / f"{shard_stem(i)}.json"
        if not path.is_file():
            raise UserError(f"{out}: shard {shard_stem(i)} is missing after extraction; re-run extraction to finish it")
        records.append(read_json(path))
    # Formats present in every shard are the store's formats.
    formats = sorted(set.intersection(*(set(r["files"]) for r in records)))
    moments: dict[str, RunningMoments] = {}
    for r in records:
        for field, m in r["moments"].items():
            if field in moments:
                moments[field].merge(RunningMoments.from_json(m))
            else:
                moments[field] = RunningMoments.from_json(m)
    fields = {}
    for field, spec in records[0]["fields"].items():
        dtype = settings["token_dtype"] if field.endswith(".tokens") else settings["pooled_dtype"]
        entry = {"dim": spec["dim"], "dtype": dtype}
        if "max_length" in spec:
            entry["max_length"] = max(r["fields"][field]["max_length"] for r in records)
        fields[field] = entry
    stats = {}
    for field, m in moments.items():
        mean, std = m.mean_std()
        stats[field] = {"count": m.count, "mean": mean.tolist(), "std": std.tolist()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "edge_glass_version": __version__,
        "split": split,
        "fingerprint": settings["fingerprint"],
        "encoder_fingerprint": settings["encoder_fingerprint"],
        "token_dtype": settings["token_dtype"],
        "pooled_dtype": settings["pooled_dtype"],
        "encoders": settings["encoders"],
        "formats": formats,
        "fields": fields,
        "num_samples": sum(r["num_samples"] for r in records),
        "shards": [{k: r[k] for k in ("name", "raw_shard", "num_samples", "files")} for r in records],
        "source": source,
        "stats": stats,
    }
    if "quantization" in settings:
        manifest["quantization"] = settings["quantization"]
    skipped: dict[str, int] = {}
    for r in records:
        for reason, n in r.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    if skipped:
        manifest["skipped"] = dict(sorted(skipped.items()))
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest

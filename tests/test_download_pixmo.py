"""PixMo downloaders, offline: local tables with the real columns, images from a local HTTP server.

pixmo_cap keeps every good image byte for byte and skips each broken one under its reason;
splits follow the image, not what failed; pixmo_qa turns each subset's rows into QA pairs,
groups them per image, honours the per-subset caps and checks image hashes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from helpers import hf_tables
from helpers.download_world import (  # noqa: F401 (fixtures)
    fast_policy,
    hf_cache,
    pixmo_cap_world,
    server,
    write,
)
from helpers.media_server import image_bytes

from edge_glass.data.hf_rows import DEFAULT_FRACTIONS, split_of
from edge_glass.data.pixmo import PixmoCapSource, PixmoQASource, _turn_pairs, parse_source_caps, resolve_caps
from edge_glass.data.raw_shards import iter_raw_samples, list_shards
from edge_glass.utils.errors import UserError


def _members(out: Path) -> dict[str, dict]:
    """Every sample of every split as raw tar members (key -> {ext: bytes})."""
    found = {}
    for split in ("train", "val", "test"):
        if not (out / split).is_dir() or not list((out / split).glob("shard-*.tar")):
            continue
        for shard in list_shards(out / split):
            for s in wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False):
                found[s["__key__"]] = s
    return found


# --- pixmo_cap ----------------------------------------------------------------------------------


def test_pixmo_cap_keeps_good_images_byte_for_byte_and_counts_each_broken_one(server, tmp_path):
    world = pixmo_cap_world(server, tmp_path / "pixmo-cap")
    source = PixmoCapSource(len(world.urls), hf_path=str(world.table), fetch=fast_policy())
    out = tmp_path / "out"
    plan, summaries = write(source, out)

    report = json.loads((out / "skipped.json").read_text())
    assert report["by_reason"] == dict(Counter(world.broken.values()))
    for entry in report["samples"]:  # each names its URL, and the reason is that URL's fault
        assert entry["reason"] == world.broken[entry["url"]] and entry["url"] in entry["detail"], entry
    assert report["candidates"] == len(world.urls) and report["kept"] == len(world.bodies)
    assert server.hits["/flaky.jpg"] == 2  # failed once, retried, kept

    members = _members(out)
    assert len(members) == len(world.bodies)
    for key, m in members.items():
        meta = json.loads(m["json"])
        url = meta["image_url"]
        image_ext = "jpg" if url.endswith(".jpg") else "png"
        assert set(m) - {"__key__", "__url__", "__local_path__"} == {image_ext, "txt", "json"}  # no audio member
        assert m[image_ext] == world.bodies[url]  # the downloaded bytes, not a re-encoding
        row = world.urls.index(url)
        assert m["txt"].decode() == f"A detailed caption of picture {row}." and meta["hf_row"] == row
        assert meta["transcripts"] == [f"transcript {row} a", f"transcript {row} b"]
        assert meta["split"] == split_of(url, 0, DEFAULT_FRACTIONS) and key.startswith(meta["split"] + "-")

    desc = json.loads((out / "dataset.json").read_text())
    assert desc["source"] == "pixmo_cap" and desc["modalities"] == ["vision", "text"]
    assert desc["params"]["split_fractions"] == [0.7, 0.15, 0.15] and desc["params"]["hf_rows"] == len(world.urls)
    assert sum(desc["splits"].values()) == len(world.urls)  # candidates per split
    for s in summaries:
        index = json.loads((out / s.split / "index.json").read_text())
        assert index["total"] == s.samples == sum(x["samples"] for x in index["shards"])
        assert index["candidates"] == desc["splits"][s.split]
        assert sum(index["skipped"].values()) == index["candidates"] - index["total"]

    decoded = [s for split in ("train", "val", "test") if (out / split / "index.json").exists()
               and json.loads((out / split / "index.json").read_text())["total"] for s in iter_raw_samples(out / split)]
    assert len(decoded) == len(world.bodies)
    assert all(s["audio"] is None and s["sample_rate"] is None and min(s["image"].size) >= 32 for s in decoded)


def test_splits_follow_the_image_not_which_fetches_failed(server, tmp_path):
    world = pixmo_cap_world(server, tmp_path / "pixmo-cap", slow=False)
    write(PixmoCapSource(len(world.urls), hf_path=str(world.table), fetch=fast_policy()), tmp_path / "a")
    # The same table, but two more images have died since.
    dead = [u for u in world.bodies][:2]
    for url in dead:
        server.routes[url[len(server.base):]].status = 404
    write(PixmoCapSource(len(world.urls), hf_path=str(world.table), fetch=fast_policy()), tmp_path / "b")

    a, b = _members(tmp_path / "a"), _members(tmp_path / "b")
    assert set(b) == set(a) - {k for k, m in a.items() if json.loads(m["json"])["image_url"] in dead}
    for key in b:  # every survivor is the same sample under the same key, in the same split
        assert {k: v for k, v in b[key].items() if not k.startswith("__")} == {
            k: v for k, v in a[key].items() if not k.startswith("__")}
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["splits"] == \
        json.loads((tmp_path / "b" / "dataset.json").read_text())["splits"]


def test_more_samples_extend_fewer_and_the_seed_changes_the_choice(tmp_path):
    urls = [f"http://images.example.org/{i}.jpg" for i in range(40)]
    hf_tables.pixmo_cap(tmp_path / "t", urls)
    small, large = (PixmoCapSource(n, hf_path=str(tmp_path / "t")) for n in (10, 25))

    def chosen(source):  # url -> (split) of the candidates, nothing is fetched
        return {urls[c.data["row"]]: c.split for s in ("train", "val", "test") for c in source.tasks(s, 0, 10**6)}

    assert chosen(small).items() <= chosen(large).items()
    assert sum(small.split_sizes().values()) == 10
    assert set(chosen(PixmoCapSource(10, seed=1, hf_path=str(tmp_path / "t")))) != set(chosen(small))


def test_hash_split_matches_the_fractions():
    counts = Counter(split_of(f"http://x/{i}.jpg", 3, (0.7, 0.15, 0.15)) for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.7) < 0.015 and abs(counts["val"] / 20000 - 0.15) < 0.015
    assert split_of("same", 3, (0.7, 0.15, 0.15)) == split_of("same", 3, (0.7, 0.15, 0.15))
    assert Counter(split_of(str(i), 0, (0.0, 1.0, 0.0)) for i in range(100)) == {"val": 100}


def test_unreachable_hub_is_one_clear_line():
    with pytest.raises(UserError) as e:
        PixmoCapSource(5)  # HF_HUB_OFFLINE=1 and no cached copy: the hub id cannot be read
    msg = str(e.value)
    assert "allenai/pixmo-cap" in msg and "--hf_path" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_missing_columns_are_named(tmp_path):
    from datasets import Dataset

    (tmp_path / "t" / "data").mkdir(parents=True)
    Dataset.from_dict({"image_url": ["http://x/a.jpg"], "text": ["hi"]}).to_parquet(str(tmp_path / "t" / "data" / "train-0.parquet"))
    with pytest.raises(UserError, match=r"missing column\(s\) caption \(it has: image_url, text\)"):
        PixmoCapSource(1, hf_path=str(tmp_path / "t"))
    with pytest.raises(UserError, match="--hf_path .*nope does not exist"):
        PixmoCapSource(1, hf_path=str(tmp_path / "nope"))


# --- pixmo_qa -----------------------------------------------------------------------------------


@pytest.fixture
def qa_world(server, tmp_path):
    bodies = [image_bytes(10 + i, fmt="JPEG") for i in range(4)]
    urls = [server.add(f"/qa/{i}.jpg", b) for i, b in enumerate(bodies)]
    charts = [image_bytes(20 + i, size=(64, 48)) for i in range(2)]
    hf_tables.pixmo_qa(tmp_path / "pixmo", urls, bodies, charts)
    server.routes["/qa/2.jpg"].status = 404  # dead link
    server.routes["/qa/3.jpg"].body = image_bytes(99, fmt="JPEG")  # the URL now serves another picture
    return tmp_path / "pixmo", urls, bodies, charts


def test_pixmo_qa_mixes_the_subsets_into_qa_samples(qa_world, tmp_path):
    root, urls, bodies, charts = qa_world
    caps = "pixmo-cap-qa=4,pixmo-ask-model-anything=4,pixmo-point-explanations=4,pixmo-count=4,pixmo-docs=2"
    source = PixmoQASource(18, hf_path=str(root), source_caps=caps, fetch=fast_policy())
    out = tmp_path / "out"
    write(source, out)

    report = json.loads((out / "skipped.json").read_text())
    # the dead link in each of the four URL subsets; the changed image where a hash says so (not cap-qa)
    assert report["by_reason"] == {"bad_url": 4, "hash_mismatch": 3}
    assert Counter(e["subset"] for e in report["samples"] if e["reason"] == "hash_mismatch") == {
        "pixmo-ask-model-anything": 1, "pixmo-point-explanations": 1, "pixmo-count": 1}

    samples = [s for split in ("train", "val", "test") if (out / split).is_dir() and list((out / split).glob("*.tar"))
               for s in iter_raw_samples(out / split)]
    by_subset = Counter(s["json"]["subset"] for s in samples)
    assert by_subset == {"pixmo-cap-qa": 3, "pixmo-ask-model-anything": 2, "pixmo-point-explanations": 2,
                         "pixmo-count": 2, "pixmo-docs": 2}
    split_of_image: dict[str, set] = {}
    for s in samples:
        meta = s["json"]
        qa = meta["qa"]
        assert qa and all(p["attribute"] == meta["subset"] and p["question"] and p["answer"] for p in qa)
        assert s["caption"] == f"{qa[0]['question']} {qa[0]['answer']}" and meta["caption_kind"] == "qa"
        assert s["audio"] is None and s["image"] is not None
        if meta["subset"] == "pixmo-docs":
            i = int(meta["image_id"].split("-")[1])
            assert [(p["question"], p["answer"]) for p in qa] == [(f"Chart {i} max?", str(i + 5)), (f"Chart {i} min?", str(i))]
        else:
            i = urls.index(meta["image_url"])
            split_of_image.setdefault(meta["image_url"], set()).add(meta["split"])
            if meta["subset"] == "pixmo-cap-qa":
                assert [(p["question"], p["answer"]) for p in qa] == [(f"What is shown in {i}?", f"Picture {i}.")]
            if meta["subset"] == "pixmo-count":
                assert [(p["question"], p["answer"]) for p in qa] == [("How many dog are there in the image?", str(i + 2))]
            if meta["subset"] == "pixmo-point-explanations":
                assert qa[0]["answer"] == f"Here is thing {i}."  # parsed_response, not the raw markup
            if meta["subset"] == "pixmo-ask-model-anything" and i == 0:
                assert len(qa) == 2  # two rows about the first image: one sample, both pairs
    # An image that several subsets use is in the same split in all of them.
    assert all(len(splits) == 1 for splits in split_of_image.values())
    # The embedded chart images are stored as the PNG bytes the table holds.
    members = _members(out)
    docs = [m for m in members.values() if json.loads(m["json"])["subset"] == "pixmo-docs"]
    assert sorted(m["png"] for m in docs) == sorted(charts)


def test_source_caps_default_and_errors(qa_world):
    root = str(qa_world[0])
    assert resolve_caps(10, {}) == {"pixmo-cap-qa": 2, "pixmo-ask-model-anything": 2, "pixmo-point-explanations": 2,
                                    "pixmo-count": 2, "pixmo-docs": 2}
    assert resolve_caps(10, parse_source_caps("pixmo-docs=4")) == {
        "pixmo-cap-qa": 2, "pixmo-ask-model-anything": 2, "pixmo-point-explanations": 1, "pixmo-count": 1, "pixmo-docs": 4}
    with pytest.raises(UserError, match=r"unknown subset 'pixmo-doc'; did you mean 'pixmo-docs'"):
        parse_source_caps("pixmo-doc=3")
    with pytest.raises(UserError, match="is not an integer"):
        parse_source_caps("pixmo-docs=lots")
    with pytest.raises(UserError, match="add up to 12, but --num_samples is 10"):
        resolve_caps(10, {"pixmo-docs": 12})
    # Only the subsets with a non-zero cap are read: the others need no local copy.
    only_docs = "pixmo-cap-qa=0,pixmo-ask-model-anything=0,pixmo-point-explanations=0,pixmo-count=0,pixmo-docs=2"
    source = PixmoQASource(2, hf_path=root, source_caps=only_docs)
    assert list(source.params()["hf_datasets"]) == ["pixmo-docs"]
    with pytest.raises(UserError, match=r"no local copy of allenai/pixmo-count at .*--source_caps pixmo-count=0"):
        PixmoQASource(2, hf_path=str(Path(root) / "pixmo-docs"), source_caps="pixmo-count=2,pixmo-cap-qa=0,"
                      "pixmo-ask-model-anything=0,pixmo-point-explanations=0,pixmo-docs=0")


def test_cap_qa_conversations_become_pairs():
    q = "[USER] What colour is the car? [ASSISTANT] Red. [USER] And the sky? [ASSISTANT]"
    assert _turn_pairs(q, "Blue.") == [("What colour is the car?", "Red."), ("And the sky?", "Blue.")]
    assert _turn_pairs("Plain question?", "Plain answer.") == [("Plain question?", "Plain answer.")]


def test_other_image_formats_are_stored_as_png_and_bombs_refused():
    import io

    from PIL import Image

    from edge_glass.data.hf_rows import verify_image
    from edge_glass.data.raw_shards import SkippedSample

    for fmt, mode in (("GIF", "P"), ("WEBP", "RGB"), ("TIFF", "CMYK"), ("BMP", "RGB")):
        buf = io.BytesIO()
        Image.new(mode, (40, 36)).save(buf, format=fmt)
        img = verify_image(buf.getvalue(), 32)
        assert img.format == "png" and img.size == (40, 36) and Image.open(io.BytesIO(img.data)).format == "PNG"
    buf = io.BytesIO()
    Image.new("RGB", (40, 36)).save(buf, format="PNG")  # 1440 pixels
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1000  # over the limit: PIL warns, the downloader skips
        with pytest.warns(Image.DecompressionBombWarning), pytest.raises(SkippedSample, match="over PIL's limit"):
            verify_image(buf.getvalue(), 1)
        Image.MAX_IMAGE_PIXELS = 500  # over twice the limit: PIL refuses to open it
        with pytest.raises(SkippedSample, match="DecompressionBombError"):
            verify_image(buf.getvalue(), 1)
    finally:
        Image.MAX_IMAGE_PIXELS = old

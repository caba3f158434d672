"""A trained run on new inputs (edge_glass/inference.py): a raw file's features and embedding
equal the store's for the same sample, zero-shot classification equals its hand computation,
and bad input is one line."""

from __future__ import annotations

import io

import pytest
import torch
from helpers.trainer_world import trainer_world

from edge_glass.data.raw_shards import iter_shard_raw
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import open_store
from edge_glass.inference import Predictor, class_embeddings, device_from
from edge_glass.utils.errors import UserError


@pytest.fixture(scope="module")
def tw(tmp_path_factory):
    return trainer_world(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(tw):
    return Predictor(tw.reference_run, device="cpu")


def _raw_sample(tw, split: str = "val", index: int = 3) -> dict:
    shard = sorted((tw.world.raw / split).glob("shard-*.tar"))[0]
    return list(iter_shard_raw(shard))[index]


def _store_batch(tw, key: str, split: str = "val") -> tuple[dict, int]:
    loader = FeatureLoader(open_store(tw.world.store, split), 16, shuffle=False, drop_last=False)
    for batch in loader:
        if key in batch["keys"]:
            return batch, batch["keys"].index(key)
    raise AssertionError(f"{key} not in the store")


def _same_features(ours: dict, batch: dict, row: int) -> None:
    n = int(ours["mask"][0].sum())
    assert n == int(batch["mask"][row].sum())
    a, b = ours["tokens"][0, :n].float(), batch["tokens"][row, :n].float()
    # Within float16 rounding: batch composition may move the float32 value by an ulp.
    assert torch.allclose(a, b, rtol=2 ** -10, atol=1e-3), float((a - b).abs().max())
    assert torch.allclose(ours["pooled"][0].float(), batch["pooled"][row].float(), rtol=2 ** -10, atol=1e-3)


def test_a_raw_file_gives_the_store_s_features_and_embedding(tw, predictor, tmp_path):
    raw = _raw_sample(tw)
    image = tmp_path / "sample.png"
    image.write_bytes(raw["png"])
    audio = tmp_path / "sample.flac"
    audio.write_bytes(raw["flac"])
    caption = raw["txt"].decode()
    batch, row = _store_batch(tw, raw["__key__"])

    _same_features(predictor.features("vision", [image]), batch["vision"], row)
    _same_features(predictor.features("audio", [audio]), batch["audio"], row)
    _same_features(predictor.features("text", [caption]), batch["text"], row)

    model = predictor.align
    with torch.no_grad():
        stored = {m: torch.nn.functional.normalize(model.adapters[m](batch[m]).float(), dim=-1)[row] for m in ("vision", "text")}
    assert torch.allclose(predictor.embed("vision", [image])[0], stored["vision"], atol=2e-3)
    assert torch.allclose(predictor.embed("text", [caption])[0], stored["text"], atol=2e-3)
    # An MRL prefix is the first dims, renormalised.
    small = predictor.embed("vision", [image], dim=8)[0]
    assert small.shape == (8,) and torch.allclose(small, torch.nn.functional.normalize(stored["vision"][:8], dim=0), atol=2e-3)


def test_zero_shot_probabilities_equal_the_hand_computation(tw, predictor, tmp_path):
    paths = []
    for i in range(4):
        raw = _raw_sample(tw, index=i)
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(raw["png"])
    names = ["red", "green", "blue"]
    templates = ["a {} shape", "something {}"]
    got = predictor.class_probabilities("vision", paths, names, templates, k=3)

    queries = predictor.embed("vision", paths)
    prompts = predictor.embed("text", [t.format(n) for n in names for t in templates]).reshape(3, 2, -1)
    classes = torch.nn.functional.normalize(prompts.mean(dim=1), dim=-1)
    probs = (predictor.align.logit_scale().float() * queries @ classes.T).softmax(dim=-1)
    for row, ranked in zip(probs, got):
        assert [i for i, _ in ranked] == row.argsort(descending=True).tolist()
        assert [p for _, p in ranked] == pytest.approx(sorted(row.tolist(), reverse=True), abs=1e-6)
    assert [[n for n, _ in r] for r in predictor.classify("vision", paths, names, templates, k=1)] == \
        [[names[r[0][0]]] for r in got]


def test_bad_inputs_are_one_line_each(predictor, tmp_path):
    def one_line(call, pattern):
        with pytest.raises(UserError, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)

    one_line(lambda: predictor.embed("vision", [tmp_path / "missing.png"]), r"missing\.png: no such file")
    bad = tmp_path / "notes.gif"
    bad.write_bytes(b"GIF89a")
    one_line(lambda: predictor.embed("vision", [bad]), r"notes\.gif: unsupported vision file type '\.gif'")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    one_line(lambda: predictor.embed("vision", [broken]), r"broken\.png: sample .* cannot be decoded")
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    tiny.write_bytes(buf.getvalue())
    one_line(lambda: predictor.embed("vision", [tiny]), r"its image is 2x2, under encoders\.vision\.min_size")
    one_line(lambda: predictor.answer("What colour?", image=tiny), r"align run: it has no decoder")
    one_line(lambda: predictor.classify("vision", [tiny], ["a"], ["no placeholder"]), r"templates must each hold")
    one_line(lambda: device_from("cuda:7"), r"--device 'cuda:7': this machine has 0 CUDA device")
    one_line(lambda: device_from("tpu"), r"--device 'tpu'")


def test_an_encoder_that_changed_since_extraction_is_refused_with_both_fingerprints(tw, tmp_path):
    p = Predictor(tw.reference_run, device="cpu")
    p.manifest = {**p.manifest, "encoders": {**p.manifest["encoders"], "vision": {**p.manifest["encoders"]["vision"],
                                                                                  "weights_sha256": "0" * 64}}}
    with pytest.raises(UserError, match=r"^encoders\.vision: .* \(encoder fingerprint \w+, store \w+\)"):
        p.embed("vision", [tmp_path / "x.png"])


def test_class_embeddings_average_the_templates_per_class():
    table = {"a x": [1.0, 0.0], "b x": [0.0, 1.0], "a y": [3.0, 0.0], "b y": [0.0, -1.0]}
    emb = class_embeddings(lambda texts: torch.tensor([table[t] for t in texts]), ["x", "y"], ["a {}", "b {}"])
    assert torch.allclose(emb, torch.nn.functional.normalize(torch.tensor([[0.5, 0.5], [1.5, -0.5]]), dim=-1))


def _script(name: str):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_search_finds_a_caption_s_own_sample_first(tw, capsys):
    import json

    raw = _raw_sample(tw, index=5)
    caption = raw["txt"].decode()
    argv = ["--run", str(tw.reference_run), "--device", "cpu", "--split", "val", "--target", "text",
            "--text", caption, "--top_k", "3", "--json"]
    assert _script("search")(argv) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["rank"] for r in results] == [1, 2, 3]
    # The store holds this caption's features; its own sample (or an identical caption) scores 1.
    assert results[0]["caption"] == caption and results[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]


def test_search_over_a_folder_finds_a_file_first_and_counts_the_unreadable(tw, tmp_path, capsys):
    import json

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        raw = _raw_sample(tw, index=i)
        place = folder / ("sub" if i % 2 else "") / f"{i:05d}.png"
        place.write_bytes(raw["png"])
        place.with_suffix(".txt").write_bytes(raw["txt"])  # img2dataset's caption beside its image
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.md").write_text("not an image")
    query = folder / "sub" / "00003.png"
    argv = ["--run", str(tw.reference_run), "--device", "cpu", "--folder", str(folder), "--target", "vision",
            "--image", str(query), "--top_k", "5", "--json"]
    assert _script("search")(argv) == 0
    out, err = capsys.readouterr()
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 5, "the five readable images, not the broken one or the notes"
    assert results[0]["key"] == "sub/00003.png" and results[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert results[0]["caption"] == _raw_sample(tw, index=3)["txt"].decode()
    assert "skipped 1 unreadable file(s)" in err and "broken.png" in err
    with pytest.raises(UserError, match="no audio files"):
        _script("search")(["--run", str(tw.reference_run), "--device", "cpu", "--folder", str(folder),
                           "--target", "audio", "--text", "a clip"])


def test_predict_classifies_files_and_refuses_a_question_to_an_align_run(tw, tmp_path, capsys):
    import json

    raw = _raw_sample(tw)
    image = tmp_path / "q.png"
    image.write_bytes(raw["png"])
    argv = ["--run", str(tw.reference_run), "--device", "cpu", "--image", str(image), "--classes", "red,green,blue",
            "--template", "a {} shape", "--top_k", "2"]
    assert _script("predict")(argv) == 0
    (line,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert line["input"] == str(image) and len(line["top"]) == 2
    assert line["top"][0]["probability"] >= line["top"][1]["probability"]
    with pytest.raises(UserError, match="align run: it has no decoder"):
        _script("predict")(["--run", str(tw.reference_run), "--device", "cpu", "--image", str(image), "What colour?"])


def test_training_s_zero_shot_classes_equal_the_predictor_s(predictor):
    import dataclasses

    from edge_glass.training.zero_shot import ZeroShotPrompts

    names, templates = ["red", "blue"], ["a {} shape", "{}"]
    cfg = dataclasses.replace(predictor.cfg, eval=dataclasses.replace(
        predictor.cfg.eval, zero_shot_classes=names, zero_shot_templates=templates))
    during_training = ZeroShotPrompts(cfg, predictor.manifest, torch.device("cpu")).class_embeddings(predictor.align)
    by_hand = class_embeddings(lambda texts: predictor.embed("text", texts), names, templates)
    assert torch.allclose(during_training, by_hand, atol=1e-5)


def test_an_encoder_is_the_store_s_whatever_precision_it_ran_in_and_v1_stores_meant_no_pooling(tw, tmp_path):
    # A store extracted in bf16 on a GPU, by a version-1 extractor that did not record `pool`:
    # the same CLIP, so its features are read, not refused.
    p = Predictor(tw.reference_run, device="cpu")
    vision = {k: v for k, v in p.manifest["encoders"]["vision"].items() if k != "pool"}
    vision["compute_dtype"] = "bfloat16"
    p.manifest = {**p.manifest, "encoders": {**p.manifest["encoders"], "vision": vision}}
    raw = _raw_sample(tw)
    image = tmp_path / "sample.png"
    image.write_bytes(raw["png"])
    assert p.embed("vision", [image]).shape[0] == 1
    # A pooled store is another encoder.
    p = Predictor(tw.reference_run, device="cpu")
    p.manifest = {**p.manifest, "encoders": {**p.manifest["encoders"], "vision": {**vision, "pool": 2}}}
    with pytest.raises(UserError, match=r"^encoders\.vision: .* now computes other features"):
        p.embed("vision", [image])


def test_an_ann_index_finds_what_exact_search_finds():
    from edge_glass.inference import SplitIndex

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1)
    rows = torch.nn.functional.normalize(centres[torch.randint(0, 50, (3000,), generator=g)]
                                         + 0.05 * torch.randn(3000, 32, generator=g), dim=1)
    keys = [f"k{i}" for i in range(3000)]
    exact = SplitIndex(keys, keys, rows)
    queries = rows[:40]
    want = exact.search(queries, 5)
    got = SplitIndex(keys, keys, rows).build_ann().search(queries, 5)
    assert [r[0]["key"] for r in got] == [f"k{i}" for i in range(40)]  # each row finds itself first
    assert all(r[0]["score"] == pytest.approx(1.0, abs=1e-5) for r in got)
    found = sum(len({x["key"] for x in a} & {x["key"] for x in b}) for a, b in zip(got, want))
    assert found / (40 * 5) >= 0.9, "recall@5 of the IVF index against exact search"
    with pytest.raises(UserError, match="cannot have 5000 lists"):
        SplitIndex(keys, keys, rows).build_ann(lists=5000)


def test_evaluate_scores_zero_shot_with_classes_and_a_nested_label_given_on_the_command_line(tw, capsys):
    import json

    from edge_glass.data.synthetic_attributes import COLOURS

    shard = sorted((tw.world.raw / "val").glob("shard-*.tar"))[0]
    colours = [json.loads(raw["json"])["attributes"]["colour"] for raw in iter_shard_raw(shard)]
    classes = ["red", "green", "blue"]
    argv = ["--run", str(tw.reference_run), "--device", "cpu", "--split", "val", "--classes", ",".join(classes),
            "--template", "a {} shape", "--template", "something {}", "--label_field", "attributes.colour"]
    assert _script("evaluate")(argv) == 0
    (report,) = [ln.split("wrote ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote ") and ln.endswith(".json")]
    written = json.loads(open(report).read())
    # Only the samples whose colour is one of the classes are classified.
    assert written["zero_shot"]["num_samples"] == sum(c in classes for c in colours) > 0
    assert 0.0 <= written["zero_shot"]["vision"]["top1"] <= 1.0
    assert set(written["zero_shot"]) == {"num_samples", "vision", "audio"}
    # The nested label groups samples of one colour: multi-positive recall beside the strict one.
    assert all("group_R@1" in row for row in written["rows"])
    assert set(COLOURS) >= set(colours)
    with pytest.raises(UserError, match="eval.zero_shot_templates: each needs"):
        _script("evaluate")(argv[:8] + ["--template", "no slot"])

"""Retrieval metrics (edge_glass/training/metrics.py) and `alignment_metrics` (training/align_eval.py).

The hand-built cases use one-hot keys, so a query's cosine with key j is exactly its j-th
coordinate over its norm. Every query row is a permutation of the same integers, so all
queries have bitwise the same norm and equal integers give bitwise-equal scores in both
directions: the ties below are real ties, not float accidents.
"""

from __future__ import annotations

import pytest
import torch

from edge_glass.config import AdapterConfig, AdaptersConfig, LossConfig, ModelConfig, PairWeightsConfig
from edge_glass.models.alignment import AlignmentModel, FeatureInfo, caption_ids
from edge_glass.training.align_eval import alignment_metrics
from edge_glass.training.metrics import ranks, retrieval_metrics, summarize

# S[i, j] = score of query i (a) against key j (b). Diagonal = own key.
S = torch.tensor(
    [
        [5, 4, 3, 2, 1],  # own 5: nothing higher                    -> rank 1
        [2, 3, 5, 4, 1],  # own 3: 5, 4 higher                       -> rank 3
        [1, 5, 4, 3, 2],  # own 4: 5 higher                          -> rank 2
        [3, 4, 5, 1, 2],  # own 1: everything higher                 -> rank 5
        [4, 5, 3, 1, 2],  # own 2: 4, 5, 3 higher                    -> rank 4
    ],
    dtype=torch.float32,
)
A_TO_B = [1, 3, 2, 5, 4]
# columns, b->a (query = key j, candidates = the a rows):
#   col0 [5,2,1,3,4] own 5 -> 1;  col1 [4,3,5,4,5] own 3 -> 5;  col2 [3,5,4,5,3] own 4 -> 3
#   col3 [2,4,3,1,1] own 1, row 4 ties -> 5;  col4 [1,1,2,2,2] own 2, rows 2 and 3 tie -> 3
B_TO_A = [1, 5, 3, 5, 3]
# rows 3 and 4 share a caption: neither competes with the other
GROUPS = torch.tensor([0, 1, 2, 3, 3])
A_TO_B_GROUPED = [1, 3, 2, 4, 4]  # row3 drops key 4 (2 >= 1); row4 drops key 3, which scored below it anyway
B_TO_A_GROUPED = [1, 5, 3, 4, 2]  # col3 drops row 4 (the tie); col4 drops row 3 (a tie)


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): a = S padded with two unused dims, b = one-hot keys, both 7-dimensional."""
    a = torch.cat([S, torch.zeros(5, 2)], dim=1)
    b = torch.eye(7)[:5]
    return a, b


def test_hand_built_ranks_both_directions() -> None:
    a, b = embeddings()
    assert ranks(a, b).tolist() == A_TO_B
    assert ranks(b, a).tolist() == B_TO_A


def test_ranks_are_invariant_to_a_rotation_and_scale() -> None:
    """Cosine similarity: any orthonormal basis and any positive row scale give the same ranks."""
    a, b = embeddings()
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    scale = torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0], dtype=torch.float64)[:, None]
    a2, b2 = (a.double() @ q * scale), (b.double() @ q)
    # ties may split under rounding, so compare only the strictly ordered queries
    assert ranks(a2, b2)[:3].tolist() == A_TO_B[:3]
    assert ranks(b2, a2)[:3].tolist() == B_TO_A[:3]


def test_ties_count_against_the_query() -> None:
    keys = torch.eye(4)
    queries = torch.eye(4).clone()
    keys[1] = keys[0]  # key 1 duplicates key 0: queries 0 and 1 each tie their own key with the other
    r = ranks(queries, keys)
    assert r.tolist() == [2, 4, 1, 1]  # query 1 scores 0 on its own key and ties keys 2, 3 too
    # a collapsed model (all keys equal) gets the worst rank, not a lucky first place
    assert ranks(torch.randn(6, 3), torch.ones(6, 3)).tolist() == [6] * 6


def test_group_ids_remove_same_caption_competitors() -> None:
    a, b = embeddings()
    assert ranks(a, b, group_ids=GROUPS).tolist() == A_TO_B_GROUPED
    assert ranks(b, a, group_ids=GROUPS).tolist() == B_TO_A_GROUPED
    # distinct ids change nothing
    assert ranks(a, b, group_ids=torch.arange(5)).tolist() == A_TO_B
    # one shared caption for everything: nobody competes
    assert ranks(a, b, group_ids=torch.zeros(5, dtype=torch.long)).tolist() == [1] * 5


def brute_force_ranks(q: torch.Tensor, k: torch.Tensor, groups: torch.Tensor | None = None) -> list[int]:
    qn = q.double() / q.double().norm(dim=-1, keepdim=True)
    kn = k.double() / k.double().norm(dim=-1, keepdim=True)
    out = []
    for i in range(len(q)):
        own = float(qn[i] @ kn[i])
        rank = 1
        for j in range(len(k)):
            if j != i and (groups is None or groups[j] != groups[i]) and float(qn[i] @ kn[j]) >= own:
                rank += 1
        out.append(rank)
    return out


@pytest.mark.parametrize("with_groups", [False, True])
def test_chunked_equals_unchunked(with_groups: bool) -> None:
    g = torch.Generator().manual_seed(1)
    n = 11
    # small integer coordinates: many exact ties, whose handling must not depend on the chunking
    q = torch.randint(-2, 3, (n, 3), generator=g).float()
    k = torch.randint(-2, 3, (n, 3), generator=g).float()
    q[q.norm(dim=-1) == 0] = 1.0
    k[k.norm(dim=-1) == 0] = 1.0
    groups = torch.tensor([0, 1, 0, 2, 3, 3, 4, 5, 6, 7, 0]) if with_groups else None
    full = ranks(q, k, chunk_size=n, group_ids=groups)
    for chunk in (1, 3, 4, n, 1024):
        assert torch.equal(ranks(q, k, chunk_size=chunk, group_ids=groups), full), chunk
    # and the chunking is tested on hand-built ranks too
    a, b = embeddings()
    for chunk in (1, 2, 3, 5):
        assert ranks(a, b, chunk_size=chunk).tolist() == A_TO_B
        assert ranks(b, a, chunk_size=chunk, group_ids=GROUPS).tolist() == B_TO_A_GROUPED


def test_ranks_match_brute_force_on_random_ties() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randint(1, 3, (9, 2), generator=g).float()
    k = torch.randint(1, 3, (9, 2), generator=g).float()
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5])
    assert ranks(q, k, chunk_size=4).tolist() == brute_force_ranks(q, k)
    assert ranks(q, k, chunk_size=2, group_ids=groups).tolist() == brute_force_ranks(q, k, groups)


def test_summarize_hand_computed() -> None:
    m = summarize(torch.tensor(A_TO_B), [1, 3, 5])
    assert m["R@1"] == pytest.approx(1 / 5)
    assert m["R@3"] == pytest.approx(3 / 5)
    assert m["R@5"] == pytest.approx(1.0)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 5 + 1 / 4) / 5)
    assert m["median_rank"] == 3.0
    assert m["mean_rank"] == pytest.approx(3.0)
    m = summarize(torch.tensor([7, 1, 1, 2, 40]), [1, 2])
    assert (m["R@1"], m["R@2"], m["median_rank"], m["mean_rank"]) == pytest.approx((0.4, 0.6, 2.0, 51 / 5))
    assert m["MRR"] == pytest.approx((1 / 7 + 1 + 1 + 1 / 2 + 1 / 40) / 5)


def test_median_rank_of_an_even_count_is_the_usual_median() -> None:
    """median([1, 2, 3, 4]) is 2.5 (numpy, retrieval papers' MdR); torch.median returns the lower 2."""
    assert summarize(torch.tensor([1, 2, 3, 4]), [1])["median_rank"] == pytest.approx(2.5)


def test_retrieval_metrics_hand_built() -> None:
    a, b = embeddings()
    m = retrieval_metrics(a, b, [1, 3], chunk_size=2, names=("vision", "text"))
    metric_names = ("R@1", "R@3", "MRR", "median_rank", "mean_rank")
    assert set(m) == {f"{d}/{k}" for d in ("vision->text", "text->vision") for k in metric_names}
    assert m["vision->text/R@1"] == pytest.approx(1 / 5)
    assert m["vision->text/R@3"] == pytest.approx(3 / 5)
    assert m["vision->text/MRR"] == pytest.approx(137 / 300)
    assert m["vision->text/median_rank"] == 3.0
    assert m["vision->text/mean_rank"] == pytest.approx(3.0)
    assert m["text->vision/R@1"] == pytest.approx(1 / 5)
    assert m["text->vision/R@3"] == pytest.approx(3 / 5)
    assert m["text->vision/MRR"] == pytest.approx(31 / 75)
    assert m["text->vision/median_rank"] == 3.0
    assert m["text->vision/mean_rank"] == pytest.approx(17 / 5)
    g = retrieval_metrics(a, b, [1, 2], group_ids=GROUPS, names=("vision", "text"))
    assert g["vision->text/mean_rank"] == pytest.approx(sum(A_TO_B_GROUPED) / 5)
    assert g["text->vision/mean_rank"] == pytest.approx(sum(B_TO_A_GROUPED) / 5)
    assert g["text->vision/R@2"] == pytest.approx(2 / 5)  # [1, 5, 3, 4, 2]; without groups 1 / 5


# --- alignment_metrics on a model --------------------------------------------------------------

DIMS = {"vision": (12, 9), "audio": (10, 6), "text": (8, 7)}  # (token width, pooled width)


def small_model() -> AlignmentModel:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    info = {
        m: FeatureInfo(
            torch.randn(e, generator=g), torch.rand(e, generator=g) + 0.5,
            torch.randn(p, generator=g), torch.rand(p, generator=g) + 0.5,
        )
        for m, (e, p) in DIMS.items()
    }
    adapters = AdaptersConfig(
        vision=AdapterConfig("attn_pool", hidden_dim=32, num_heads=4),
        audio=AdapterConfig("perceiver", hidden_dim=32, num_heads=4, num_latents=4, depth=1),
        text=AdapterConfig("mlp", hidden_dim=32),
    )
    model_cfg = ModelConfig(shared_dim=32, adapters=adapters, mrl_dims=[8, 16])
    loss_cfg = LossConfig(pairs=PairWeightsConfig(vision_text=1.0, audio_text=0.5))
    return AlignmentModel(model_cfg, loss_cfg, info)


def loader_batches(sizes: list[int], seed: int = 0, duplicate: tuple[int, int] | None = None) -> list[dict]:
    """FeatureLoader-shaped batches; `duplicate=(i, j)` gives global rows i and j one caption and
    identical text features (two renders of one caption)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    captions = [f"caption {i}" for i in range(n)]
    rows = []
    for i in range(n):
        row = {}
        for m, (e, p) in DIMS.items():
            length = int(torch.randint(1, 7, (), generator=g))
            row[m] = (torch.randn(length, e, generator=g), torch.randn(p, generator=g))
        rows.append(row)
    if duplicate:
        i, j = duplicate
        captions[j] = captions[i]
        rows[j]["text"] = rows[i]["text"]
    batches, start = [], 0
    for size in sizes:
        chunk = rows[start : start + size]
        keys = [f"k{start + r}" for r in range(size)]
        batch = {"keys": keys, "captions": captions[start : start + size], "meta": ["{}"] * size}
        for m in DIMS:
            T = max(r[m][0].shape[0] for r in chunk)
            tokens = torch.zeros(size, T, DIMS[m][0])
            mask = torch.zeros(size, T, dtype=torch.bool)
            for r, row in enumerate(chunk):
                t = row[m][0]
                tokens[r, : len(t)] = t
                mask[r, : len(t)] = True
            pooled = torch.stack([row[m][1] for row in chunk])
            batch[m] = {"tokens": tokens.half(), "mask": mask, "pooled": pooled.half()}
        batches.append(batch)
        start += size
    return batches


def test_alignment_metrics_keys_per_pair_and_mrl_dim() -> None:
    model = small_model()
    assert model.dims == [8, 16, 32]
    m = alignment_metrics(model, loader_batches([4, 4, 3]), ks=[1, 5])
    want = {
        f"{pair}@{d}/{q}->{k}/{metric}"
        for pair, (q0, k0) in (("vision_text", ("vision", "text")), ("audio_text", ("audio", "text")))
        for d in (8, 16, 32)
        for q, k in ((q0, k0), (k0, q0))
        for metric in ("R@1", "R@5", "MRR", "median_rank", "mean_rank")
    }
    assert set(m) == want
    assert all(0.0 <= v <= 1.0 for key, v in m.items() if "R@" in key or "MRR" in key)
    assert all(1.0 <= v <= 11.0 for key, v in m.items() if "rank" in key)


def test_alignment_metrics_values_use_prefixes_groups_and_every_sample() -> None:
    model = small_model().train()
    batches = loader_batches([4, 4, 3], seed=1, duplicate=(1, 6))  # one caption in two batches
    m = alignment_metrics(model, batches, ks=[1, 5], chunk_size=2)
    assert model.training  # evaluation leaves the training mode as it found it

    model.eval()
    with torch.no_grad():
        parts = [model.embed(b) for b in batches]
    emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    assert emb["vision"].shape == (11, 32)  # every sample, the short last batch included
    ids = caption_ids([c for b in batches for c in b["captions"]], torch.device("cpu"))
    for pair, a, b in (("vision_text", "vision", "text"), ("audio_text", "audio", "text")):
        for d in (8, 16, 32):
            want = retrieval_metrics(emb[a][:, :d], emb[b][:, :d], [1, 5], group_ids=ids, names=(a, b))
            for key, value in want.items():
                assert m[f"{pair}@{d}/{key}"] == pytest.approx(value, abs=1e-9), (pair, d, key)
    # rows 1 and 6 have identical text embeddings: without the caption ids, each would tie its twin
    no_groups = retrieval_metrics(emb["vision"], emb["text"], [1, 5], names=("vision", "text"))
    assert m["vision_text@32/vision->text/mean_rank"] < no_groups["vision->text/mean_rank"]
    # the check above can tell the prefixes apart: 8 dims rank differently from 32 on this data
    w8 = retrieval_metrics(emb["vision"][:, :8], emb["text"][:, :8], [1, 5], group_ids=ids)
    w32 = retrieval_metrics(emb["vision"], emb["text"], [1, 5], group_ids=ids)
    assert w8 != w32


def test_alignment_metrics_chunking_does_not_matter() -> None:
    model = small_model()
    batches = loader_batches([5, 5], seed=2)
    ref = alignment_metrics(model, batches, ks=[1, 5])
    for chunk in (1, 3):
        assert alignment_metrics(model, batches, ks=[1, 5], chunk_size=chunk) == ref



def test_multi_positive_ranks_count_the_best_key_of_the_query_s_group():
    from edge_glass.training.metrics import positive_ranks, ranks

    # Unit vectors at angles (degrees); queries and keys of 4 samples, labels [A, A, B, B].
    def at(*degrees):
        rad = torch.tensor(degrees, dtype=torch.float64) * torch.pi / 180
        return torch.stack([rad.cos(), rad.sin()], dim=1)

    queries = at(0, 90, 180, 45)
    keys = at(80, 5, 170, 40)
    labels = torch.tensor([7, 7, 3, 3])
    # Query 0 (0 deg): its own key (80) is beaten by keys at 5 and 40 -> strict rank 3; its best
    # positive is key 1 (5 deg, same label), and no key outside the group is closer -> rank 1.
    # Query 1 (90): its own key (5, 85 off) is beaten by keys at 80, 40 and 170 -> strict rank 4;
    # its best positive is key 0 (80, 10 off), the negatives at 40 and 170 are farther -> rank 1.
    # Query 2 (180): own key 170 is best overall -> 1 and 1.
    # Query 3 (45): own key 40 (5 off) -> strict 1; group {2, 3}: best 40 -> 1.
    assert ranks(queries, keys).tolist() == [3, 4, 1, 1]
    assert positive_ranks(queries, keys, labels).tolist() == [1, 1, 1, 1]
    # One label per sample: each group is the sample alone, the strict ranks.
    assert positive_ranks(queries, keys, torch.tensor([0, 1, 2, 3])).tolist() == ranks(queries, keys).tolist()
    m = retrieval_metrics(queries, keys, [1, 2], labels=labels, names=("q", "k"))
    assert m["q->k/R@1"] == 0.5 and m["q->k/group_R@1"] == 1.0
    # Keys -> queries, hand-computed: key 0 (80): queries at 90 (same group, 10 off) best -> 1.
    assert m["k->q/group_R@1"] == 1.0


def _with_labels(batches: list[dict], labels: list) -> None:
    """Give the batches' samples raw JSON with `label` (None: no label field), in order."""
    import json

    values = iter(labels)
    for batch in batches:
        batch["meta"] = [json.dumps({} if (v := next(values)) is None else {"label": v}) for _ in batch["keys"]]
    assert next(values, "end") == "end"


def test_labels_from_the_samples_json_give_group_metrics_equal_to_hand_ranks() -> None:
    from edge_glass.training.align_eval import embed_split
    from edge_glass.training.metrics import positive_ranks

    model = small_model()
    batches = loader_batches([4, 4, 3])
    labels = ["a", "b", None, "a", "b", "b", "c", None, "a", "c", "b"]  # two samples without a label
    _with_labels(batches, labels)
    m = alignment_metrics(model, batches, ks=[1, 5], label_field="label")
    emb, _ = embed_split(model, batches)
    # Unlabelled samples are a group of their own: ids 100+i never equal another's.
    ids = torch.tensor([{"a": 0, "b": 1, "c": 2}.get(v, 100 + k) for k, v in enumerate(labels)])
    for d in (8, 32):
        want = positive_ranks(emb["vision"][:, :d], emb["text"][:, :d], ids)
        assert m[f"vision_text@{d}/vision->text/group_R@1"] == pytest.approx(float((want <= 1).double().mean()))
        assert m[f"vision_text@{d}/vision->text/group_mean_rank"] == pytest.approx(float(want.double().mean()))
    # Without the field in any sample, only the strict metrics.
    plain = alignment_metrics(model, loader_batches([4, 4, 3]), ks=[1, 5], label_field="label")
    assert not any("group_" in k for k in plain)
    assert plain == alignment_metrics(model, loader_batches([4, 4, 3]), ks=[1, 5])


def test_zero_shot_accuracy_equals_the_hand_count() -> None:
    from edge_glass.training.zero_shot import zero_shot_metrics

    # 5 samples, 3 classes along the axes of a 3-d space; sample 4 has no known class.
    emb = {"vision": torch.tensor([[1.0, 0.1, 0], [0.2, 1.0, 0], [0.9, 0, 1.0], [0.1, 0, 1.0], [1.0, 1.0, 1.0]])}
    classes = torch.eye(3)
    truth = torch.tensor([0, 1, 2, 0, -1])
    m = zero_shot_metrics(emb, truth, classes, ["vision"], ks=(1, 2))
    # top-1 predictions: 0, 1, 2 (1.0 > 0.9), 2 -> right, right, right, wrong = 3/4.
    # top-2: sample 3 scores (0.1, 0, 1): its class 0 is second -> a hit, 4/4.
    assert m["zero_shot/vision/top1"] == 0.75
    assert m["zero_shot/vision/top2"] == 1.0
    assert m["zero_shot/num_samples"] == 4.0
    assert zero_shot_metrics(emb, torch.full((5,), -1), classes, ["vision"]) == {}


def test_alignment_metrics_score_zero_shot_with_the_model_s_own_class_embeddings() -> None:
    model = small_model()
    batches = loader_batches([4, 4, 3])
    names = ["cat", "dog", "fox"]
    labels = ["dog", "cat", "fox", "owl", "dog", "fox", "cat", "cat", None, "fox", "dog"]
    _with_labels(batches, labels)
    g = torch.Generator().manual_seed(5)
    class_emb = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)

    class Prompts:  # what ZeroShotPrompts offers, with fixed class embeddings
        class_names = names

        def class_embeddings(self, _model):
            return class_emb

    m = alignment_metrics(model, batches, ks=[1], label_field="label", zero_shot=Prompts())
    from edge_glass.training.align_eval import embed_split

    emb, _ = embed_split(model, batches)
    known = [k for k, v in enumerate(labels) if v in names]
    for modality in ("vision", "audio"):
        pred = (torch.nn.functional.normalize(emb[modality], dim=-1) @ class_emb.T).argmax(dim=1)
        want = sum(int(pred[k]) == names.index(labels[k]) for k in known) / len(known)
        assert m[f"zero_shot/{modality}/top1"] == pytest.approx(want)
    assert m["zero_shot/num_samples"] == len(known) and "zero_shot/text/top1" not in m

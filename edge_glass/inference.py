"""Use a trained run on new inputs: embed raw files, classify zero-shot, answer questions.

    p = Predictor("runs/vision_text_qwen", device="cuda")
    p.embed("vision", ["cat.jpg"])                    # [1, D] unit vectors in the shared space
    p.classify("vision", ["cat.jpg"], ["cat", "dog"])  # top classes from prompts through the text side
    p.answer("What is the animal doing?", image="cat.jpg")   # an instruct run's decoder

The run's recorded config says which frozen encoders made its store; they are rebuilt from it
and checked against the store's manifest (the encoders' own description: weights hash, layer,
preprocessing), so a changed encoder is refused with both fingerprints rather than feeding the
adapters features they never saw. Raw files go through the very code extraction uses: the raw
shards' decoder (`data/raw_shards.decode_sample`), the encoders' preprocessing and
`features/extract.encode_batch` (float16 features, as a float16 store holds them), then the
loader's batch layout — so a file's features equal the store's for the same sample.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from edge_glass.decoders.base import Sampling
from edge_glass.encoders.base import FrozenEncoder
from edge_glass.features.raw_features import checked_encoder, features_of, raw_sample
from edge_glass.features.sample_checks import raw_problem
from edge_glass.features.store import open_store
from edge_glass.modalities import TEXT, raw_field
from edge_glass.training.align_task import to_device
from edge_glass.training.task import load_run
from edge_glass.training.zero_shot import DEFAULT_TEMPLATES, check_templates, class_embeddings
from edge_glass.utils.errors import UserError

_RAW_KINDS = {"vision": ("png", "jpg", "jpeg"), "audio": ("flac", "wav")}
"""The file extensions the raw shards' decoder reads per modality (data/raw_shards.py)."""


def device_from(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N`; a device this machine lacks is one line naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise UserError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r}: only cpu and cuda devices are supported")
    return device


class Predictor:
    """A trained run (align or instruct) with its frozen encoders, on one device."""

    def __init__(self, run: str | Path, which: str = "best", device: str = "auto") -> None:
        """`run`: a run directory (`which` checkpoint) or an export folder."""
        from edge_glass.export import export_manifest, is_export, load_export

        self.device = device_from(device)
        if is_export(run):  # an export folder (scripts/export.py): no store, no DeepSpeed checkpoint
            self.cfg, model, self.checkpoint = load_export(run)
            self.manifest = export_manifest(run)
        else:
            self.cfg, model, self.checkpoint = load_run(run, which)
            self.manifest = open_store(self.cfg.data.features_dir, self.cfg.data.splits.train,
                                       self.cfg.data.store_format).manifest
        self.model = model.to(self.device).eval()
        # The alignment model: the whole model of an align run, the adapters of an instruct run.
        self.align = getattr(self.model, "align", self.model)
        self._encoders: dict[str, FrozenEncoder] = {}

    # -- features ------------------------------------------------------------------------------

    def encoder(self, modality: str) -> FrozenEncoder:
        """The frozen encoder of `modality`, built from the run's config and checked against the store."""
        if modality not in self._encoders:
            if modality not in self.align.adapters:
                raise UserError(f"{modality}: the run has no {modality} adapter (model.adapters.{modality})")
            self._encoders[modality] = checked_encoder(self.cfg, self.manifest, modality, self.device)
        return self._encoders[modality]

    def features(self, modality: str, items: Sequence) -> dict[str, torch.Tensor]:
        """Store-layout features (`tokens` [N, T, D] float16, `mask`, `pooled`) of raw items:
        file paths (images, audio) or strings (text); decoded images and (waveform, rate) pairs too."""
        encoder = self.encoder(modality)  # a refused encoder before any file is read
        return features_of(encoder, modality, [self._sample(modality, item, i) for i, item in enumerate(items)])

    @torch.no_grad()
    def embed(self, modality: str, items: Sequence, dim: int | None = None) -> torch.Tensor:
        """Unit-length shared-space embeddings [N, dim] (dim: any MRL size; default the full one)."""
        return self._embed_features(modality, self.features(modality, items), dim)

    def _embed_features(self, modality: str, features: dict, dim: int | None) -> torch.Tensor:
        out = self.align.adapters[modality](to_device(features, self.device)).float()
        return torch.nn.functional.normalize(out[:, : dim or out.shape[1]], dim=-1).cpu()

    # -- zero-shot classification --------------------------------------------------------------------

    @torch.no_grad()
    def classify(self, modality: str, items: Sequence, class_names: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES, k: int = 5, dim: int | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (class, probability) per item: each class is the mean of its prompts' text
        embeddings (CLIP's prompt ensembling), scored by cosine similarity and the model's learned
        temperature."""
        return [[(class_names[i], p) for i, p in row] for row in self.class_probabilities(
            modality, items, class_names, templates, k, dim)]

    @torch.no_grad()
    def class_probabilities(self, modality: str, items: Sequence, class_names: Sequence[str],
                            templates: Sequence[str] = DEFAULT_TEMPLATES, k: int = 5,
                            dim: int | None = None) -> list[list[tuple[int, float]]]:
        """`classify` with class indices instead of names."""
        if not class_names:
            raise UserError("zero-shot classification needs at least one class name")
        check_templates(templates)  # before any encoder runs
        queries = self.embed(modality, items, dim)
        classes = class_embeddings(lambda texts: self.embed(TEXT, texts, dim), class_names, templates)
        probs = (self.align.logit_scale().float().cpu() * queries @ classes.T).softmax(dim=-1)
        top = probs.topk(min(k, len(class_names)), dim=-1)
        return [[(int(i), float(p)) for i, p in zip(idx, val)] for idx, val in zip(top.indices, top.values)]

    # -- search -----------------------------------------------------------------------------------

    @torch.no_grad()
    def index_split(self, split: str, modality: str, dim: int | None = None) -> "SplitIndex":
        """Unit embeddings of every sample of a split of the run's store, in store order."""
        from edge_glass.features.loader import FeatureLoader
        from edge_glass.features.store import open_checked_split
        from edge_glass.utils.progress import progress_bar

        if modality not in self.align.adapters:
            raise UserError(f"{modality}: the run has no {modality} adapter (model.adapters.{modality})")
        data = open_checked_split(self.cfg, split)
        loader = FeatureLoader(data, self.cfg.data.eval_batch_size, modalities=[modality], shuffle=False, drop_last=False)
        keys, captions, parts = [], [], []
        with progress_bar(f"index {split} ({modality})", len(data)) as bar:
            for batch in loader:
                out = self.align.adapters[modality](to_device(batch, self.device)[modality]).float()
                parts.append(torch.nn.functional.normalize(out[:, : dim or out.shape[1]], dim=-1).cpu())
                keys += batch["keys"]
                captions += batch["captions"]
                bar.advance(len(batch["keys"]))
        return SplitIndex(keys, captions, torch.cat(parts))

    @torch.no_grad()
    def index_files(self, folder: str | Path, modality: str, dim: int | None = None) -> "SplitIndex":
        """Unit embeddings of every `modality` file under `folder` (recursively, in path order):
        images (png, jpg, jpeg), audio (flac, wav) or texts (txt, one text a file). An image's or
        clip's caption is the text file beside it with the same stem (img2dataset's layout), if
        any. A file that cannot be read or decoded is skipped, counted and named in
        `SplitIndex.skipped`: one broken photo does not lose a folder's index."""
        from edge_glass.utils.progress import progress_bar

        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
        kinds = _RAW_KINDS.get(modality, ("txt",) if modality == TEXT else ())
        encoder = self.encoder(modality)  # a run without the adapter, or a changed encoder: refused before any file
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in kinds and p.is_file())
        if not paths:
            raise UserError(f"{folder}: no {modality} files ({', '.join(kinds)}) in it or below it")
        keys, captions, parts, skipped = [], [], [], []
        step = self.cfg.data.eval_batch_size
        with progress_bar(f"index {folder.name} ({modality})", len(paths)) as bar:
            for start in range(0, len(paths), step):
                samples = []
                for path in paths[start : start + step]:
                    try:  # read and decoded one by one, so a corrupt file is known by name
                        item = _read_text(path) if modality == TEXT else path
                        sample = self._sample(modality, item, len(keys))
                        problem = raw_problem(sample, {modality: encoder})
                        if problem is not None:  # what extraction would refuse (an empty clip...)
                            raise UserError(f"{path}: {problem[1]}")
                        samples.append(sample)
                    except UserError as e:
                        skipped.append(str(e))
                        continue
                    keys.append(str(path.relative_to(folder)))
                    captions.append(item if modality == TEXT else _caption_beside(path))
                if samples:
                    parts.append(self._embed_features(modality, features_of(encoder, modality, samples), dim))
                bar.advance(len(paths[start : start + step]))
        if not keys:
            raise UserError(f"{folder}: none of its {len(paths)} {modality} files could be read; first: {skipped[0]}")
        return SplitIndex(keys, captions, torch.cat(parts), skipped)

    # -- answering -------------------------------------------------------------------------------

    @torch.no_grad()
    def answer(self, question: str, *, image=None, audio=None, max_new_tokens: int | None = None,
               sampling: Sampling | None = None, stream: Callable[[str], None] | None = None) -> str:
        """The instruct run's answer to `question` about an image and/or a clip: greedy, or drawn
        with `sampling`; `stream` receives its text piece by piece as it is generated."""
        if not hasattr(self.model, "decoder"):
            raise UserError(f"{self.cfg.experiment.name} is an {self.cfg.train.stage} run: it has no decoder to "
                            "answer with (train the instruct stage, or embed/classify with this run)")
        given = {"vision": image, "audio": audio}
        prefix_modalities = list(self.cfg.decoder.prefix_modalities)
        missing = [m for m in prefix_modalities if given.get(m) is None]
        if missing:
            raise UserError(f"this run's decoder reads {' and '.join(prefix_modalities)}; give --{missing[0].replace('vision', 'image')}")
        batch = {m: self.features(m, [given[m]]) for m in prefix_modalities}
        examples = [{"prompt": question, "answer": ""}]
        decoder = self.model.decoder
        n = self.cfg.decoder.num_prefix_tokens * len(prefix_modalities)
        batch.update(decoder.encode_examples(examples, n))
        batch.update(decoder.generation_inputs(examples, n))
        batch = to_device(batch, self.device)
        prefix = self.model.prefix(batch)
        max_new_tokens = max_new_tokens or self.cfg.eval.max_new_tokens
        if {"sampling", "stream"} <= set(inspect.signature(decoder.answer).parameters):
            answers, _ = decoder.answer(prefix, batch, max_new_tokens=max_new_tokens, sampling=sampling, stream=stream)
            return answers[0]
        # A plug-in decoder written to the older contract (decoders/base.py): greedy, streamed whole.
        if sampling is not None:
            raise UserError(f"the {decoder.kind} decoder does not sample; ask without a temperature")
        answers, _ = decoder.answer(prefix, batch, max_new_tokens=max_new_tokens)
        if stream is not None:
            stream(answers[0])
        return answers[0]

    # -----------------------------------------------------------------------------------------------

    def _sample(self, modality: str, item, index: int) -> dict:
        """A decoded raw sample holding `item` in `modality`'s raw field, as extraction sees one."""
        key = f"input {index}"
        if modality == TEXT:
            if not isinstance(item, str):
                raise UserError(f"text input {index}: expected a string, got {type(item).__name__}")
            return raw_sample(key, caption=item)
        if isinstance(item, (str, Path)):
            return raw_sample(**decode_file(Path(item), modality))
        if modality == "audio":
            return raw_sample(key, audio=item[0], sample_rate=item[1])
        return raw_sample(key, **{raw_field(modality): item})


class SplitIndex:
    """Cosine search over unit embeddings: exact (a matrix product per query batch) unless
    `build_ann` switched it to an approximate faiss index.

    Exact is the default because it is what a search costs end to end: on the project's 2-core CPU
    box (benchmarks/search.py, BENCHMARKS.md) a query over 100k rows x 256 dims takes 16 ms
    exactly, while an ANN index first takes 4-7 s to build — a one-shot `scripts/search.py` call
    is always faster exact. An index kept and queried many times (a notebook, a service) is where
    faiss pays: IVF-Flat answers in ~0.13 ms at recall@10 = 1.0 and repays its build after a few
    hundred queries.
    """

    def __init__(self, keys: list[str], captions: list[str], embeddings: torch.Tensor,
                 skipped: Sequence[str] = ()) -> None:
        self.keys, self.captions, self.embeddings = keys, captions, embeddings
        self.skipped = list(skipped)
        """Why each input left out of the index was (a folder's unreadable files)."""
        self._ann = None

    def build_ann(self, lists: int | None = None, probe: int = 16) -> "SplitIndex":
        """Answer `search` from a faiss IVF-Flat index (inner product, which is the cosine on unit
        rows): `lists` k-means cells (default 4 * sqrt(rows), the benchmark's setting), `probe`
        of them searched per query. Needs `pip install faiss-cpu` (or faiss-gpu)."""
        try:
            import faiss
        except ImportError:
            raise UserError("an ANN index needs faiss: pip install faiss-cpu (or use exact search)") from None
        rows = self.embeddings.float().contiguous().numpy()
        n, dim = rows.shape
        lists = lists or max(1, int(4 * math.sqrt(n)))
        if lists > n:
            raise UserError(f"an ANN index of {n} rows cannot have {lists} lists; exact search is the right tool at this size")
        ann = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        # k-means needs ~40-64 points a list; more only slows training (faiss samples anyway).
        sample = rows if n <= 64 * lists else rows[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: 64 * lists].numpy()]
        ann.train(sample)
        ann.add(rows)
        ann.nprobe = min(probe, lists)
        self._ann = ann
        return self

    def search(self, queries: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """Per query: the top-k samples as {key, caption, score}, best first."""
        if queries.shape[1] != self.embeddings.shape[1]:
            raise UserError(f"queries have {queries.shape[1]} dims, the index {self.embeddings.shape[1]}; use the same --dim")
        k = min(k, len(self.keys))
        if self._ann is None:
            top = (queries @ self.embeddings.T).topk(k, dim=1)
            values, indices = top.values.tolist(), top.indices.tolist()
        else:
            scores, found = self._ann.search(queries.float().contiguous().numpy(), k)
            values, indices = scores.tolist(), found.tolist()
        # faiss marks a slot it could not fill (fewer than k rows in the probed lists) with -1.
        return [[{"key": self.keys[i], "caption": self.captions[i], "score": float(v)} for v, i in zip(vals, idx) if i >= 0]
                for vals, idx in zip(values, indices)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None


def _caption_beside(path: Path) -> str:
    beside = path.with_suffix(".txt")
    try:
        return beside.read_text(encoding="utf-8").strip() if beside.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return ""  # a caption is only shown beside a result; an unreadable one is not worth a skip


def decode_file(path: Path, modality: str) -> dict:
    """The raw fields of one file, decoded by the raw shards' decoder (so a file and the same
    bytes in a shard decode alike); a missing, unreadable or unsupported file is one line."""
    from edge_glass.data.raw_shards import decode_sample

    kinds = _RAW_KINDS.get(modality)
    if kinds is None:
        raise UserError(f"{path}: {modality} inputs are not read from files")
    ext = path.suffix.lower().lstrip(".")
    if ext not in kinds:
        raise UserError(f"{path}: unsupported {modality} file type {path.suffix or '(none)'!r}; use {', '.join(kinds)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    decoded = decode_sample({"__key__": path.name, "jpg" if ext == "jpeg" else ext: data, "txt": b"x", "json": b"{}"},
                            url=str(path))
    decoded["key"] = str(path)
    return {k: v for k, v in decoded.items() if k in ("key", "image", "audio", "sample_rate")}

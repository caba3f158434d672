#!/usr/bin/env python
"""Ask a trained run about new files: answer a question, classify zero-shot, or embed.

    python scripts/predict.py --run runs/vision_text_qwen --image cat.png "What colour is the shape?"
    python scripts/predict.py --run runs/vision_text_qwen --image cat.png --temperature 0.7 --seed 1 "Describe it."
    python scripts/predict.py --run runs/quickstart --image cat.png --classes red,green,blue \\
        --template "a {} shape." --template "something {}"
    python scripts/predict.py --run runs/quickstart --image cat.png --text "a red circle" --out emb.pt

The run's frozen encoders are rebuilt from its config and checked against its store; the files go
through the same decoding and preprocessing as extraction (edge_glass/inference.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from edge_glass.utils.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (align or instruct)")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--image", action="append", default=[], help="an image file (png, jpg); repeatable")
    parser.add_argument("--audio", action="append", default=[], help="an audio file (flac, wav); repeatable")
    parser.add_argument("--text", action="append", default=[], help="a text to embed; repeatable")
    parser.add_argument("--classes", default=None, help="zero-shot: comma-separated class names")
    parser.add_argument("--template", action="append", default=[],
                        help="zero-shot prompt template with {} for the class (repeatable; default: 'a photo of a {}.', '{}')")
    parser.add_argument("--top_k", type=int, default=5, help="zero-shot: classes shown per input")
    parser.add_argument("--dim", type=int, default=None, help="MRL dimension of embeddings (default: the full one)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="answer length limit (default: eval.max_new_tokens)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="answer: 0 (the default) answers greedily; above 0 samples at this temperature")
    parser.add_argument("--top_p", type=float, default=1.0, help="answer, sampled: nucleus probability mass")
    parser.add_argument("--seed", type=int, default=None, help="answer, sampled: seed of the draw (repeatable answers)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="answer: print tokens as they are generated (default: when stdout is a terminal)")
    parser.add_argument("--out", default=None, help="embed: save {modality: tensor} here (torch.save)")
    parser.add_argument("question", nargs="?", default=None, help="a question for an instruct run")
    args = parser.parse_args(argv)

    from edge_glass.decoders.base import Sampling
    from edge_glass.inference import DEFAULT_TEMPLATES, Predictor
    from edge_glass.utils.errors import UserError

    p = Predictor(args.run, args.checkpoint, args.device)
    if args.question is not None:
        if len(args.image) > 1 or len(args.audio) > 1:
            raise UserError("a question takes one --image and/or one --audio")
        sampling = None if args.temperature == 0 else Sampling(args.temperature, args.top_p, args.seed)
        stream = sys.stdout.isatty() if args.stream is None else args.stream
        answer = p.answer(args.question, image=args.image[0] if args.image else None,
                          audio=args.audio[0] if args.audio else None, max_new_tokens=args.max_new_tokens,
                          sampling=sampling, stream=(lambda text: print(text, end="", flush=True)) if stream else None)
        print("" if stream else answer)  # a streamed answer is already out: end its line
        return 0
    inputs = {m: v for m, v in (("vision", args.image), ("audio", args.audio), ("text", args.text)) if v}
    if not inputs:
        raise UserError("give inputs: --image, --audio or --text (and a question, or --classes)")
    if args.classes is not None:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        templates = args.template or list(DEFAULT_TEMPLATES)
        for modality, items in inputs.items():
            if modality == "text":
                raise UserError("--classes classifies images or audio; texts are what the classes become")
            for item, top in zip(items, p.classify(modality, items, names, templates, args.top_k, args.dim)):
                print(json.dumps({"input": item, "top": [{"class": c, "probability": round(q, 4)} for c, q in top]}))
        return 0
    embeddings = {m: p.embed(m, items, args.dim) for m, items in inputs.items()}
    for m, emb in embeddings.items():
        print(f"{m}: {tuple(emb.shape)} unit vectors")
    if args.out:
        import torch

        torch.save(embeddings, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Grounding probe: how fast does a tiny Qwen2.5-VL, trained from scratch, learn where to click, per image-token budget?

The learning proof's hard part isolated (issue #6): single-object synthetic images (`ibisagent_training.synthetic`),
the instruction "segment the <name>", and as the only target the first action line the product's grammar writes for
the simulator's first click ("Positive Point (x, y)", released dialect, two decimals). Plain next-token loss on that
line, fresh images every step, AdamW. Every `--eval-every` steps the model generates greedily on held-out images (200 by default)
and the click is parsed with the product's grammar: hit = the click lies in the object; err = distance to the
simulator's click in image widths.

The pixel budget sets the image-token count: the 112 px images are resized to `pixels` a side, and Qwen2.5-VL writes
one token per 28 x 28 pixels, so 28 -> 1 token, 56 -> 4, 112 -> 16.

Measured on this project's 2-core machine (one process per budget side by side, OMP_NUM_THREADS=1):
    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.grounding_probe --pixels 28 --seconds 600 &
    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.grounding_probe --pixels 112 --seconds 600
Prints one row per evaluation and a final summary line.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import numpy as np
from PIL import Image

from experiments.learning_proof import APPEARANCES, DIALECT, PLANS, SHAPES
from ibisagent.grammar import ActionParseError, Grammar
from ibisagent.metrics import click_in_target
from ibisagent.simulator import next_click
from ibisagent.testing import build_tiny_qwen2_5_vl
from ibisagent_training.synthetic import generate_image


def main(argv: list[str] | None = None) -> int:
    from ibisagent._compat import ensure_torchvision

    ensure_torchvision()
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=int, default=28, help="image side after resizing (a multiple of 28)")
    parser.add_argument("--size", type=int, default=112, help="side of the synthetic images")
    parser.add_argument("--seconds", type=float, default=600, help="training time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=200, help="held-out images per evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pool", type=int, default=0, help="draw training images from a fixed set of this many (0: fresh every step)"
    )
    args = parser.parse_args(argv)
    if args.pixels % 28:
        parser.error(f"--pixels {args.pixels} is not a multiple of 28 (one image token per 28 x 28 pixels)")

    torch.manual_seed(args.seed)
    # The learning proof's CPU model, so the probe measures what the proof trains.
    model, processor = build_tiny_qwen2_5_vl(
        None, seed=args.seed, min_pixels=args.pixels**2, max_pixels=args.pixels**2, **PLANS["cpu"].model
    )
    tokenizer = processor.tokenizer
    grammar = Grammar(DIALECT, decimals=2)
    n = args.size

    def case(split: str, index: int):
        im = generate_image(args.seed, index, size=n, split=split, shapes=SHAPES, appearances=APPEARANCES)
        obj = im.objects[0]
        click = next_click(np.zeros(obj.mask.shape, bool), obj.mask)
        return Image.fromarray(im.image), obj.name, grammar.format_click(click, (n, n)), obj.mask, click

    def prompt(name: str) -> str:
        messages = [
            {"role": "system", "content": ""},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"segment the {name}"}]},
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def batch(items):
        tokenizer.padding_side = "right"
        texts = [prompt(name) + line + tokenizer.eos_token for _, name, line, _, _ in items]
        enc = processor(text=texts, images=[i[0] for i in items], return_tensors="pt", padding=True)
        labels = torch.full_like(enc["input_ids"], -100)
        for row, (_, _, line, _, _) in enumerate(items):
            k = len(tokenizer(line + tokenizer.eos_token)["input_ids"])
            end = int(enc["attention_mask"][row].sum())
            labels[row, end - k : end] = enc["input_ids"][row, end - k : end]
        return {**enc, "labels": labels}

    test = [case("probe-test", i) for i in range(args.test_images)]

    def evaluate() -> tuple[float, float]:
        model.eval()
        tokenizer.padding_side = "left"
        hits, errors = 0, []
        with torch.no_grad():
            for start in range(0, len(test), 50):
                items = test[start : start + 50]
                enc = processor(
                    text=[prompt(name) for _, name, _, _, _ in items],
                    images=[i[0] for i in items],
                    return_tensors="pt",
                    padding=True,
                )
                out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for text, (_, _, _, mask, gold) in zip(texts, items):
                    try:
                        click = grammar.parse_action(text.strip(), (n, n)).clicks[0]
                    except (ActionParseError, IndexError):
                        continue  # an unparsable line is a miss
                    hits += click_in_target(click, mask)
                    errors.append(math.hypot(click.x - gold.x, click.y - gold.y) / n)
        model.train()
        return hits / len(test), float(np.mean(errors)) if errors else float("nan")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    step, t0, loss = 0, time.perf_counter(), float("nan")
    print(f"pixels {args.pixels} ({(args.pixels // 28) ** 2} image token(s)), batch {args.batch}, lr {args.lr}")
    print("| step | seconds | loss | hit | err |\n|---|---|---|---|---|", flush=True)
    rng = random.Random(args.seed)
    while time.perf_counter() - t0 < args.seconds:
        items = [case("probe-train", rng.randrange(args.pool or 10**9)) for _ in range(args.batch)]
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        out = model(**batch(items))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, loss = step + 1, out.loss.item()
        if step % args.eval_every == 0:
            hit, err = evaluate()
            print(f"| {step} | {time.perf_counter() - t0:.0f} | {loss:.3f} | {hit:.3f} | {err:.3f} |", flush=True)
    hit, err = evaluate()
    seconds = time.perf_counter() - t0
    print(
        f"final: pixels {args.pixels}, {step} steps in {seconds:.0f} s ({step / seconds:.2f} steps/s), "
        f"loss {loss:.3f}, hit {hit:.3f}, err {err:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

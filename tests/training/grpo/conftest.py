"""The GRPO tests' shared set-up: synthetic shapes (BiomedParse layout), a VQA file, short templates, a one-family
instruction library, and a tiny Qwen2.5-VL nudged toward two valid turns, built once for the whole folder."""

from __future__ import annotations

import json

import pytest

from ibisagent.chat import PromptTemplates, assistant_message, system_message, user_message
from ibisagent_training.common import collate
from ibisagent_training.grpo import GRPOArguments, SegmentationRows
from ibisagent_training.prompts import INITIAL_FAMILIES, InstructionLibrary
from ibisagent_training.synthetic import write_synthetic_dataset

SHORT_TEMPLATES = {
    "ibis_system.txt": "Click to segment. Reply <think>..</think><action>name: positive (x, y)</action>.",
    "ibis_first.txt": "{instruction}",
    "ibis_refine.txt": "Refine: {instruction}",
}


@pytest.fixture(scope="package")
def setup(tmp_path_factory):
    from ibisagent.testing import build_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("grpo")
    write_synthetic_dataset(root / "shapes", 6, seed=0, size=112, objects=(1, 2), appearances=("bright", "dark"))
    (root / "vqa.json").write_text(
        json.dumps(
            [
                {
                    "image": "shapes/train/train000000_Synthetic_shapes.png",
                    "question": "Is there a shape?",
                    "answer": "yes",
                },
                {"image": "shapes/train/train000001_Synthetic_shapes.png", "question": "Is it empty?", "answer": "no"},
            ]
        )
    )
    templates = root / "templates"
    templates.mkdir()
    for name, text in SHORT_TEMPLATES.items():
        (templates / name).write_text(text)
    (root / "instructions.json").write_text(
        json.dumps({"initial": {f: ["segment the {target}"] for f in INITIAL_FAMILIES}})
    )
    model_dir = root / "tiny"
    model, processor = build_tiny_qwen2_5_vl(max_pixels=112 * 112)
    rows = SegmentationRows(str(root / "shapes"), None, instructions(root), 3)
    teach(model, processor, PromptTemplates.load("ibis", templates), [rows[0], rows[1]])
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return root, model_dir, model, processor


def instructions(root) -> InstructionLibrary:
    return InstructionLibrary.from_file(root / "instructions.json")


def teach(model, processor, templates, rows, steps: int = 150) -> None:
    """A few plain gradient steps toward two valid turns (a click, an answer), so that sampled episodes mix valid
    and unusable turns and their rewards differ (an untrained model's are all equal: no advantage, no update)."""
    import torch

    from ibisagent_training.sft import Conversation, encode

    texts = [
        "<think></think><action>target: positive (0.5, 0.5)</action>",
        "<think></think><action>Terminate</action><answer>yes</answer>",
    ]
    encoded = []
    for text, row in [(t, r) for t in texts for r in rows]:
        for first in (True, False):
            messages = [
                system_message(templates, row.instruction, []),
                user_message(templates, row.instruction, [], first=first),
                assistant_message(text),
            ]
            encoded.append(encode(processor, Conversation("teach", messages, [row.image], [True])))
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    model.eval()


def make_args(root, **kw) -> GRPOArguments:
    base = dict(
        output_dir=str(root / "out"),
        data=str(root / "shapes"),
        template_dir=str(root / "templates"),
        num_generations=2,
        prompts_per_step=2,
        max_steps=1,
        max_turns=3,
        max_new_tokens=48,
        learning_rate=1e-3,
        instructions=str(root / "instructions.json"),
        save_steps=0,
        logging_steps=0,
    )
    base.update(kw)
    return GRPOArguments(**base)

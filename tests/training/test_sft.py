"""Cold-start SFT: conversations from simulated trajectories, loss masks, and a smoke run of trl's SFTTrainer on a
tiny Qwen2.5-VL built from a config (params change, loss goes down, resume continues the same run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ibisagent.grammar import Grammar
from ibisagent_training.common import IGNORE_INDEX, collate
from ibisagent_training.generate import GenerateConfig, generate
from ibisagent_training.sft import ConversationBuilder, SFTDataset, encode, load_records
from tests.conftest import needs_demo
from tests.training.conftest import write_small_demo

pytestmark = needs_demo
VARIANTS = ["gold", "self_correction", "user_inconsistency"]


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    demo = write_small_demo(root / "Demo", size=128)
    cfg = GenerateConfig(
        max_steps=4, stop_iou=0.6, max_length=4, min_dice=0.6, self_correction=1.0, user_inconsistency=1.0
    )
    generate(demo, root / "gen", cfg, progress=False)
    return root / "gen"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ibisagent.testing import build_tiny_qwen2_5_vl

    out = tmp_path_factory.mktemp("tiny")
    model, processor = build_tiny_qwen2_5_vl(out, max_pixels=112 * 112)
    return out, model, processor


def _label_spans(enc) -> list[list[int]]:
    """The runs of consecutive trained tokens."""
    spans, cur = [], []
    for tok, lab in zip(enc["input_ids"].tolist(), enc["labels"].tolist()):
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert lab == tok
            cur.append(tok)
    return spans + ([cur] if cur else [])


def test_unmasked_tokens_are_exactly_the_reasoning_and_actions(trajectories, tiny):
    _, _, processor = tiny
    records = load_records(trajectories, VARIANTS)
    record = next(r for r in records if r.variant == "self_correction")
    (conv,) = ConversationBuilder().build(record)
    steps = record.trajectory["steps"]
    assert len(conv.images) == len(steps) == len(conv.assistant_texts)
    (wrong,) = record.trajectory["meta"]["masked_steps"]
    assert conv.train == [k != wrong for k in range(len(steps))]
    enc = encode(processor, conv)
    decoded = [processor.tokenizer.decode(s) for s in _label_spans(enc)]
    expected = [t + "<|im_end|>" for t, ok in zip(conv.assistant_texts, conv.train) if ok]
    assert decoded == expected
    # the wrong click is in the context the model reads, but never a label
    full = processor.tokenizer.decode(enc["input_ids"])
    assert conv.assistant_texts[wrong] in full and all(conv.assistant_texts[wrong] not in d for d in decoded)
    assert enc["image_grid_thw"].shape[0] == len(steps)
    assert int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum()) == len(steps)
    # every trained turn parses back to the trajectory's action
    g = Grammar("ibis")
    for text, step in zip(conv.assistant_texts, steps):
        parsed = g.parse(text, tuple(record.trajectory["image_size"]), record.target)
        assert parsed.action.to_dict()["undo"] == step["action"]["undo"]
        assert parsed.action.terminate == step["action"]["terminate"]


def test_user_inconsistency_and_absent_samples(trajectories, tiny):
    _, _, processor = tiny
    records = load_records(trajectories, VARIANTS)
    ui = next(r for r in records if r.variant == "user_inconsistency")
    (conv,) = ConversationBuilder().build(ui)
    assert conv.assistant_texts[0].split("<action>")[1].strip().startswith("Undo")
    assert not np.array_equal(conv.images[0], conv.images[1])  # the wrong mask is shown, then gone
    builder = ConversationBuilder()
    absent = builder.build_absent(records[0], "appendix")
    assert (
        len(absent.images) == 1 and "Terminate" in absent.assistant_texts[0] and "<answer>" in absent.assistant_texts[0]
    )
    ds = SFTDataset(records, processor, builder, absent_fraction=1.0)
    assert sum(a is not None for _, a, _ in ds.items) == sum(r.variant == "gold" for r in records)


def test_current_history_gives_one_sample_per_trained_step(trajectories, tiny):
    _, _, processor = tiny
    records = load_records(trajectories, VARIANTS)
    builder = ConversationBuilder(history="current")
    ds = SFTDataset(records, processor, builder)
    masked = sum(len(r.trajectory["meta"].get("masked_steps", [])) for r in records)
    assert len(ds) == sum(len(r.trajectory["steps"]) for r in records) - masked
    every = builder.build(records[0])
    for k, conv in enumerate(every):  # one step built alone is that step of the whole list
        (alone,) = builder.build(records[0], only=k)
        assert alone.messages == conv.messages and np.array_equal(alone.images[0], conv.images[0])
    batch = collate([ds[0], ds[1]], processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["image_grid_thw"].shape[0] == 2
    first = SFTDataset(records, processor, builder, first_step_only=True)
    assert len(first) == len(records) and all(k == 0 for _, _, k in first.items)
    assert first.conversation(0).messages == every[0].messages
    with pytest.raises(ValueError, match="first_step_only needs history 'current'"):
        SFTDataset(records, processor, ConversationBuilder(history="full"), first_step_only=True)


def test_sft_chat_options_are_the_policy_specs():
    """dialect, history, template_dir and the pixel budget are PolicySpec's fields (same checks); policy_spec(model)
    is the inference policy that sees what this data trains."""
    from ibisagent.specs import SpecError
    from ibisagent_training.sft import SFTDataArguments

    data = SFTDataArguments(history="current", dialect="released", max_pixels=112 * 112)
    spec = data.policy_spec("out/model")
    assert (spec.model, spec.history, spec.dialect, spec.max_pixels) == ("out/model", "current", "released", 12544)
    with pytest.raises(SpecError, match="history 'last' is invalid"):
        SFTDataArguments(history="last")
    with pytest.raises(SpecError, match="min_pixels 0 is invalid"):
        SFTDataArguments(min_pixels=0)


def _train(trajectories, model_dir, out_dir, steps, resume=None, save_steps=2):
    from trl import ModelConfig, SFTConfig

    from ibisagent_training.sft import SFTDataArguments, build_trainer

    args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=save_steps,
        report_to=[],
        seed=0,
        use_cpu=True,
        gradient_checkpointing=False,
        lr_scheduler_type="constant",
        warmup_steps=0,
        dataloader_num_workers=0,
        save_only_model=False,
    )
    args.resume_from_checkpoint = resume
    data = SFTDataArguments(trajectories=str(trajectories), history="current", absent_fraction=0.0, max_records=4)
    trainer = build_trainer(data, args, ModelConfig(model_name_or_path=str(model_dir), dtype="float32"))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_sft_smoke_learns_and_resumes(trajectories, tiny, tmp_path):
    import torch

    model_dir, model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _train(trajectories, model_dir, tmp_path / "a", steps=8, save_steps=4)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)
    # stop at 4 (checkpoint), resume to 8: the same run
    _train(trajectories, model_dir, tmp_path / "b", steps=4, save_steps=4)
    resumed = _train(
        trajectories, model_dir, tmp_path / "b", steps=8, save_steps=4, resume=str(tmp_path / "b" / "checkpoint-4")
    )
    assert resumed.state.global_step == 8
    res_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert np.allclose(res_losses[-4:], losses[-4:], rtol=1e-4)
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v, after[k], atol=1e-5), k


def test_sft_cli_help_and_errors(tmp_path, capsys):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ibisagent_training.cli", "sft", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--trajectories" in out.stdout and "--use_peft" in out.stdout
    from ibisagent_training.sft import main

    assert main(["--output_dir", str(tmp_path), "--trajectories", str(tmp_path), "--use_cpu"]) == 2
    assert "model_name_or_path" in capsys.readouterr().err
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model_name_or_path": str(tmp_path),
                "trajectories": str(tmp_path),
                "output_dir": str(tmp_path),
                "use_cpu": True,
            }
        )
    )
    assert main(["--config", str(cfg)]) == 2
    assert "no trajectories-*.jsonl files" in capsys.readouterr().err


def _sft_options(trajectories, model_dir, out) -> list[str]:
    options = {
        "model_name_or_path": model_dir,
        "trajectories": trajectories,
        "history": "current",
        "absent_fraction": 0,
        "max_records": 4,
        "output_dir": out,
        "max_steps": 2,
        "per_device_train_batch_size": 1,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "save_steps": 1,
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
        "dtype": "float32",
        "gradient_checkpointing": False,
    }
    return ["--use_cpu", *(str(x) for k, v in options.items() for x in (f"--{k}", v))]


def test_sft_with_two_processes_keeps_the_processes_in_step_and_resumes(trajectories, tiny, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) through sft's own `main`: both processes hold
    the same weights after every step, the learning rate follows the 1-process run's, and a run resumed from the
    step-1 checkpoint reproduces the straight one."""
    from tests.training import distributed_probe
    from tests.training.launch import accelerate_launch, read_records

    model_dir, _, _ = tiny
    straight, resumed, single = tmp_path / "straight", tmp_path / "resumed", tmp_path / "single"
    resume_options = [*_sft_options(trajectories, model_dir, resumed), "--resume_from_checkpoint"]
    accelerate_launch(
        ["tests.training.distributed_probe", "sft", str(straight), *_sft_options(trajectories, model_dir, straight)]
    )
    accelerate_launch(
        ["tests.training.distributed_probe", "sft", str(resumed), *resume_options, str(straight / "checkpoint-1")]
    )
    assert distributed_probe.run("sft", str(single), _sft_options(trajectories, model_dir, single)) == 0
    ranks = read_records(straight)
    assert [[r["step"] for r in rank] for rank in ranks] == [[1, 2], [1, 2]]
    for step in range(2):
        assert ranks[0][step]["checksum"] == ranks[1][step]["checksum"], f"the processes differ after step {step + 1}"
    (one,) = read_records(single, 1)
    assert [r["lr"] for r in ranks[0]] == [r["lr"] for r in one] and one[0]["lr"] > one[1]["lr"]
    for a, b in zip(ranks, read_records(resumed)):
        assert [r["step"] for r in b] == [2] and b[0] == a[-1]  # the same weights and learning rate

"""Learning proof: the whole pipeline trains an agent from scratch (issue #6).

Synthetic shapes in BiomedParse layout (`ibisagent_training.synthetic`) -> trajectories simulated with the classical
tool in the loop (`ibisagent_training.generate`) -> a tiny Qwen2.5-VL built from a config, trained by our SFT
(`ibisagent_training.sft`, trl) and then our multi-turn GRPO (`ibisagent_training.grpo`) -> evaluated on held-out
images by the evaluation runner (`ibisagent.evaluation.runner`: `HFVLMPolicy` greedy in `run_episode` with the
classical tool, the runner's metrics), next to baselines: the runner's image-center click (the row "centre click")
and oracle, and one click on a random object of the image.

Run (CPU; the seeds run side by side, one process each, `--jobs N` to choose; an interrupted run continues, and a
run whose phases are already on disk reuses them, e.g. to try RL settings from the same SFT models):
    .venv/bin/python -m experiments.learning_proof --out proof-cpu
Measured on 2 cores at this CPU plan, 3 seeds side by side, 400 held-out cases (200 images); the table ends with the
four checks, and each seed's first-click probe is in seed<k>/probe.jsonl, its times in seed<k>/timing.json.
- Seeds 0-2 (the default): 47.5 minutes, data included (68 s). The probe's hit rate stayed at 0.3 or below for the
  first 600-900 steps, then climbed; the first-click phase stopped at 1,100 / 1,200 / 1,300 steps, and with the 150
  conversation steps each seed's SFT took 1,050-1,180 s. After SFT format-valid 1.00 and IoU 0.161 +- 0.017, above the
  centre click's 0.077. After RL IoU 0.195 +- 0.029 (gain +0.034, seed spread 0.029) and click-in-target
  0.257 +- 0.026 against SFT's 0.228 +- 0.020 (gain +0.028, seed spread 0.026): all four checks met, every seed gains
  in both (IoU +0.020 / +0.017 / +0.067, click-in-target +0.027 / +0.010 / +0.047).
- Seeds 3-5 (--seeds 3 4 5): 54.0 minutes with the first run's data reused (about 55 with it made afresh). Seeds 3
  and 4 stopped at 900 steps; seed 5's probe stayed at 0.08-0.19 until step 1,900 and reached 0.555 at the 2,400-step
  cap. After SFT format-valid 1.00, IoU 0.144 +- 0.002 and click-in-target 0.195 +- 0.010; after RL 0.177 +- 0.015
  (gain +0.033, spread 0.015) and 0.239 +- 0.020 (gain +0.044, spread 0.020): all four checks met, every seed gains
  in both (IoU +0.025 / +0.018 / +0.054, click-in-target +0.013 / +0.048 / +0.073).
- 60 multi-turn GRPO steps of 32 prompts x 8 episodes run at 0.044-0.051 steps/s with three seeds sharing two cores
  (0.072 for seed 5, whose RL ran alone); step mode 0.137-0.150 steps/s.
With a fixed 1,200 first-click steps instead (--override '{"sft_probe_images": 0, "sft_single_steps": 1200}'),
seeds 0-2 met the four checks too (39.0 minutes; click-in-target 0.231 -> 0.251, IoU 0.168 -> 0.188), but on seeds
3-5 both RL checks failed: seed 5 had not learned where to click (click-in-target 0.093, IoU 0.072) and RL did not
rescue it (0.085 / 0.055). When grounding emerges varies by seed, hence the probe. The agent stays weak: it clicks
the named object less often than a click on a random object of the image would (0.48-0.49).
What RL needed (measured on the fixed-step cold start; each variant is an --override of the rl_* fields with the SFT
phases reused). On a seed-0 SFT model of 1,600 first-click steps (IoU 0.185 / click-in-target 0.240), at 8 prompts a
step with group-std advantages: 60 steps at lr 1e-4 reached 0.197 / 0.250; sampling at temperature 0.5 or 0.3 instead
did worse (0.155-0.162 / 0.225-0.228); lr 3e-4 at temperature 0.5 drove the training format-valid rate to 0.5-0.75;
four ratio passes per batch (mu = 4, 16 prompts) gave 0.183 / 0.233 after 30 steps. 32 prompts a step at lr 3e-4 with
advantages not scaled by the group std gave 0.221 / 0.295 after 30 steps and 0.249 / 0.310 after 60 (this plan's RL);
lr 6e-4 lowered the training format-valid rate to about 0.8 within 20 steps. Over 3 seeds that 1,600-step start
reached more (SFT click-in-target 0.279 +- 0.029, IoU 0.211 +- 0.024; after RL 0.307 +- 0.016 and 0.247 +- 0.012,
42.0 minutes), but RL's click gain there (+0.070, +0.018, -0.005 per seed) stayed inside the seed spread: after RL the
greedy rate stood at 0.285-0.326, where the stronger seeds' SFT already was; a linear decay of the rate to 0
(rl_lr_scheduler, same SFT models) gained less (+0.016, to 0.288-0.300). Sampled at temperature 1 the SFT policy hits
the target far less often than greedily: over RL the training episodes' rate rises from 0.11-0.15 to 0.19-0.23 in all
six seeds of the two runs above (the table's last line; the moving mean in reward_curves.png), still rising at
step 60.
GPU mode (larger model, more steps; for a lent GPU machine):
    .venv/bin/python -m experiments.learning_proof --mode gpu --out proof-gpu

Writes <out>/results.json, <out>/table.md (mean ± std over seeds) and <out>/reward_curves.png, and prints the table;
each evaluation's per-case rows, masks and trajectories are in <out>/seed<k>/eval/<row>/ (the runner's results.csv).
Choices that make spatial grounding learnable from scratch (see experiments/grounding_probe.py for the measurement):
one image token per image (the 112 px images are shown at 28 px: Qwen2.5-VL's patch embedding and 2x2 merger then
hold each pixel's place explicitly, whereas across a grid of image tokens only the rotary offsets tell tokens apart,
which a model this small did not learn in 958 steps at 4x4 tokens), two-decimal coordinates in the released
checkpoint's dialect (no target name to copy), an empty <think>, an empty system prompt and a short user prompt (short
sequences), and a curriculum: first clicks on single objects (one-step samples with no Terminate turns, which held
grounding back when they filled half the batch), then whole conversations on images with distractors where the
instruction names the target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ibisagent.evaluation.cases import Case
from ibisagent.evaluation.runner import (
    FixedClicksPolicy,
    Method,
    agent_method,
    baseline_methods,
    center_click,
    evaluate,
)
from ibisagent.io import read_mask
from ibisagent.tools.classical import ClassicalTool
from ibisagent_training.prompts import InstructionLibrary

SHAPES = ("disc", "ellipse", "square", "rectangle", "triangle")  # no ring: its centre is background
APPEARANCES = ("bright", "dark")
DIALECT = "released"  # "Positive Point (x, y)": no target name to copy, the episode's target is implied
TEMPLATES = {
    f"{DIALECT}_system.txt": "",
    f"{DIALECT}_first.txt": "{instruction}",
    f"{DIALECT}_refine.txt": "{instruction}. Mask shown.",
}
LIBRARY = {
    "initial": {
        f: ["segment the {target}"]
        for f in ("direct", "goal", "conditional", "compound", "protocol", "conversational", "concise")
    },
    "answers": {s: ["Done."] for s in ("direct", "affirmation", "object", "qa", "conversational")},
}


@dataclass
class Plan:
    """Sizes and steps of one mode."""

    size: int = 112
    pixels: int = 28  # the image processor's budget: pixels**2 of area, (pixels / 28)**2 image tokens
    single_images: int = 4000
    multi_images: int = 1500
    rl_images: int = 2000  # RL prompts: 1-3 objects, the held-out set's mix (no trajectories needed)
    test_images: int = 200
    model: dict = field(
        default_factory=lambda: dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            vision_hidden_size=64,
            vision_depth=2,
            vision_num_heads=2,
            vision_intermediate_size=128,
            rope_theta=10.0,
        )
    )
    # The first-click phase runs until greedy first clicks land inside the object on this share of held-out
    # single-object images (checked every sft_probe_every steps on sft_probe_images images), at most
    # sft_single_steps steps: when grounding emerges varies by seed, and a fixed step count does not wait for it.
    sft_single_steps: int = 2400
    sft_probe_target: float = 0.6
    sft_probe_every: int = 100
    sft_probe_images: int = 200
    sft_multi_steps: int = 150
    sft_batch: int = 32
    sft_lr: float = 1e-3
    sft_multi_lr: float = 1e-3  # the conversation phase's rate
    sft_single_history: str = "current"  # one sample per step in the grounding phase: one image, short sequences
    sft_single_first_only: bool = True  # and only the first click: Terminate samples mixed in held grounding back
    sft_scheduler: str = "constant_with_warmup"
    rl_steps: int = 60
    rl_prompts: int = 32  # 256 episodes a step: a less noisy gradient, which a rate this high needs
    rl_generations: int = 8
    rl_lr: float = 3e-4
    rl_lr_scheduler: str = "constant"
    rl_max_turns: int = 3
    rl_temperature: float = 1.0
    rl_iterations: int = 1  # mu: optimisation passes over each rollout batch (clipped ratio)
    # Advantages not divided by the group's std: most groups hold no hit, and dividing would blow their small
    # differences (a format slip) up to the size of a hit's.
    rl_scale_rewards: str = "none"
    step_mode_steps: int = 4  # a short step-level run, for its steps/s
    eval_max_steps: int = 4


PLANS = {
    "cpu": Plan(),
    "gpu": Plan(
        size=224,
        pixels=224,  # 8x8 image tokens: not measured yet (no GPU lent); a larger model may learn the grid
        single_images=4000,
        multi_images=8000,
        test_images=200,
        model=dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1536,
            vision_hidden_size=256,
            vision_depth=4,
            vision_num_heads=4,
            vision_intermediate_size=768,
            rope_theta=50.0,
        ),
        sft_single_steps=4000,
        sft_probe_target=0.9,
        sft_multi_steps=3000,
        sft_batch=64,
        sft_lr=1e-3,
        rl_steps=300,
        rl_prompts=16,
        rl_generations=8,
        rl_lr=2e-5,
    ),
}


# -- data --------------------------------------------------------------------------------------------------------------
def make_data(out: Path, plan: Plan) -> dict:
    from ibisagent_training.generate import GenerateConfig, generate
    from ibisagent_training.synthetic import write_synthetic_dataset

    shapes = out / "shapes"
    kw = dict(size=plan.size, shapes=SHAPES, appearances=APPEARANCES, overwrite=True)
    if not (out / "traj-multi").is_dir():
        write_synthetic_dataset(shapes, plan.single_images, 0, objects=(1, 1), split="single", **kw)
        write_synthetic_dataset(shapes, plan.multi_images, 0, objects=(2, 3), split="multi", targets="one", **kw)
        write_synthetic_dataset(shapes, plan.test_images, 0, objects=(1, 3), split="test", **kw)
        config = GenerateConfig(max_steps=4, stop_iou=0.85, max_length=4, min_dice=0.85)
        for split in ("single", "multi"):
            generate(shapes, out / f"traj-{split}", config, split=split, progress=False)
    if not (shapes / "rl.json").is_file():
        write_synthetic_dataset(shapes, plan.rl_images, 0, objects=(1, 3), split="rl", **kw)
    if plan.sft_probe_images and not (shapes / "probe.json").is_file():
        write_synthetic_dataset(shapes, plan.sft_probe_images, 0, objects=(1, 1), split="probe", **kw)
    (out / "templates").mkdir(exist_ok=True)
    for name, text in TEMPLATES.items():
        (out / "templates" / name).write_text(text)
    (out / "instructions.json").write_text(json.dumps(LIBRARY))
    return {"shapes": shapes, "templates": out / "templates", "instructions": out / "instructions.json"}


@dataclass
class HeldOut:
    """A held-out split as evaluation cases (one per object of each image, in file order), and per case id the mask
    files of all the objects of its image (the random-object baseline's choice)."""

    cases: list[Case]
    objects: dict[str, list[Path]]


def held_out_cases(shapes: Path, instructions: Path, split: str = "test") -> HeldOut:
    """Every object of every image of a held-out split as an evaluation case, its question an instruction from the
    same instruction library as training."""
    library = InstructionLibrary.from_file(instructions)
    doc = json.loads((shapes / f"{split}.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    held_out = HeldOut([], {})
    for im in doc["images"]:
        masks = [shapes / f"{split}_mask" / a["mask_file"] for a in by_image[im["id"]]]
        for a, mask in zip(by_image[im["id"]], masks):
            question = library.initial(a["target"], "Synthetic", random.Random(a["id"])).text
            case = Case(
                mask.stem, question, a["target"], "Synthetic", shapes / split / im["file_name"], mask, "biomedparse"
            )
            held_out.cases.append(case)
            held_out.objects[case.case_id] = masks
    return held_out


# -- evaluation: the evaluation runner's episodes, baselines and metrics ---------------------------------------------
METRICS = ("format_valid", "click_in_target", "iou", "dice", "steps")
BASELINES = {"centre click": "image-center", "random object": "random-object", "oracle": "oracle"}  # row: method


def _means(rows: list[dict], method: str) -> dict:
    mine = [r for r in rows if r["method"] == method]
    return {k: float(np.mean([r[k] for r in mine])) for k in METRICS}


def _afresh(folder: Path) -> Path:
    # A reused phase may hold another model than the one evaluated into this folder before: never resume.
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def evaluate_policy(policy, cases: list[Case], max_steps: int, out: Path) -> dict:
    """Greedy episodes of `policy` run by the evaluation runner with the classical tool into `out` (results.csv,
    masks, trajectories; emptied first); the runner's per-case metrics (METRICS) averaged over the cases."""
    rows = evaluate(cases, [agent_method(policy, max_steps)], ClassicalTool(), _afresh(out), progress=False)
    return _means(rows, "agent")


def random_object_method(held_out: HeldOut, seed: int) -> Method:
    """The tool alone with one positive click at the deepest pixel of a randomly chosen object of the case's image
    (the target or another; drawn per case, in case order, from a generator seeded with `seed`)."""
    rng = np.random.default_rng(seed)
    chosen = {case_id: objects[int(rng.integers(len(objects)))] for case_id, objects in held_out.objects.items()}

    def policy_for(case: Case, gt: np.ndarray) -> FixedClicksPolicy:
        click = center_click(read_mask(chosen[case.case_id], gt.shape), case.target)
        return FixedClicksPolicy([click], "One positive click at the centre of a random object of the image.")

    return Method("random-object", "tool + 1 click on a random object", policy_for, 1)


def evaluate_baselines(held_out: HeldOut, seed: int, max_steps: int, out: Path) -> dict:
    """The baseline rows (BASELINES) run by the evaluation runner into `out`: its image-center baseline (one
    positive click at the image centre), a random object (`random_object_method`) and its oracle (the simulator's
    clicks until IoU 0.9 or max_steps)."""
    methods = baseline_methods(["image-center"], max_steps)
    methods += [random_object_method(held_out, seed), *baseline_methods(["oracle"], max_steps)]
    rows = evaluate(held_out.cases, methods, ClassicalTool(), _afresh(out), progress=False)
    return {row: _means(rows, name) for row, name in BASELINES.items()}


# -- training ------------------------------------------------------------------------------------------------------------
def grounding_stop(cases: list[Case], templates: Path, every: int, target: float, log: Path):
    """A trainer callback: every `every` steps, the greedy first click on each probe case (one step through the
    evaluation runner, as `evaluate_policy`, into a temporary folder); appends {"step", "click_in_target", "format_valid"} to `log` (JSON lines) and
    stops training once click_in_target >= target."""
    from transformers import TrainerCallback

    from ibisagent.policies.hf_vlm import HFVLMPolicy

    class GroundingStop(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step % every:
                return
            model.eval()
            policy = HFVLMPolicy(model, processing_class, dialect=DIALECT, template_dir=templates, max_new_tokens=80)
            with tempfile.TemporaryDirectory() as folder:
                probe = evaluate_policy(policy, cases, 1, Path(folder))
            model.train()
            record = {"step": state.global_step, **{k: probe[k] for k in ("click_in_target", "format_valid")}}
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"probe {record}", flush=True)
            if probe["click_in_target"] >= target:
                control.should_training_stop = True

    return GroundingStop()


def run_sft(
    init: Path,
    out: Path,
    trajectories: Path,
    data: dict,
    plan: Plan,
    steps: int,
    seed: int,
    lr: float,
    history: str = "full",
    first_only: bool = False,
    callbacks: list | None = None,
) -> tuple[float, int]:
    """Train and save to `out`; returns (seconds, steps run)."""
    from trl import ModelConfig, SFTConfig

    from ibisagent_training.sft import SFTDataArguments, build_trainer

    data_args = SFTDataArguments(
        trajectories=str(trajectories),
        variants="gold",
        dialect=DIALECT,
        history=history,
        first_step_only=first_only,
        template_dir=str(data["templates"]),
        absent_fraction=0.0,
        instructions=str(data["instructions"]),
        reasoning=False,
        decimals=2,
        build_seed=seed,
    )
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=plan.sft_batch,
        learning_rate=lr,
        lr_scheduler_type=plan.sft_scheduler,
        warmup_steps=10,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=not _cuda(),
        bf16=_cuda(),
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # trl's default recomputes every forward: pointless at this size
        max_length=None,
        disable_tqdm=True,
    )
    trainer = build_trainer(
        data_args, args, ModelConfig(model_name_or_path=str(init), dtype="float32"), callbacks=callbacks
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_model(str(out))
    return seconds, trainer.state.global_step


def run_grpo(start: Path, out: Path, data: dict, plan: Plan, seed: int, mode: str, steps: int, folder: Path) -> list:
    from ibisagent_training.grpo import GRPOArguments, GRPOTrainer

    args = GRPOArguments(
        model_name_or_path=str(start),
        output_dir=str(out),
        mode=mode,
        dialect=DIALECT,
        data=str(folder),
        split="rl" if mode == "multi_turn" else None,
        template_dir=str(data["templates"]),
        instructions=str(data["instructions"]),
        max_turns=plan.rl_max_turns,
        num_generations=plan.rl_generations,
        prompts_per_step=plan.rl_prompts,
        max_steps=steps,
        learning_rate=plan.rl_lr,
        lr_scheduler_type=plan.rl_lr_scheduler,
        max_new_tokens=80,
        micro_batch_size=16,
        save_steps=0,
        logging_steps=5,
        seed=seed,
        temperature=plan.rl_temperature,
        num_iterations=plan.rl_iterations,
        scale_rewards=plan.rl_scale_rewards,
        mixed_precision="bf16" if _cuda() else "no",
    )
    return GRPOTrainer(args).train()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_policy(folder: Path, templates: Path):
    from ibisagent.policies.hf_vlm import HFVLMPolicy

    return HFVLMPolicy.from_pretrained(
        folder,
        dialect=DIALECT,
        template_dir=templates,
        max_new_tokens=80,
        device="cuda" if _cuda() else "cpu",
        dtype="float32",
    )


# -- report --------------------------------------------------------------------------------------------------------------
def _mean_std(per_seed: list[dict], metric: str) -> tuple[float, float]:
    v = np.array([r[metric] for r in per_seed])
    return float(v.mean()), float(v.std())


def table(results: dict) -> str:
    lines = ["| policy | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, per_seed in results.items():
        cells = ["{:.3f} ± {:.3f}".format(*_mean_std(per_seed, m)) for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def criteria(results: dict) -> list[tuple[str, bool]]:
    """The issue's acceptance checks on the table: (line stating the measured figures, met?). The seed spread is the
    larger standard deviation over seeds of the two rows compared."""

    def stat(row: str, metric: str) -> tuple[float, float]:
        return _mean_std(results[row], metric)

    out = []
    fv, _ = stat("SFT", "format_valid")
    out.append((f"SFT format-valid {fv:.3f} >= 0.95", fv >= 0.95))
    sft, _ = stat("SFT", "iou")
    centre, _ = stat("centre click", "iou")
    out.append((f"SFT IoU {sft:.3f} > centre-click IoU {centre:.3f}", sft > centre))
    for metric in ("iou", "click_in_target"):
        (a, sa), (b, sb) = stat("SFT", metric), stat("SFT+RL", metric)
        spread = max(sa, sb)
        gains = [r[metric] - s[metric] for r, s in zip(results["SFT+RL"], results["SFT"])]
        out.append(
            (
                f"RL {metric} gain {b - a:+.3f} > seed spread {spread:.3f} "
                f"(per seed: {', '.join(f'{g:+.3f}' for g in gains)})",
                b - a > spread,
            )
        )
    return out


def training_rise(curves: dict, window: int = 10) -> str:
    """The sampled training episodes' click-in-target over GRPO, per seed: the mean of the first and of the last
    `window` steps of rl/metrics.jsonl (greedy evaluation hides how rarely a sampled episode hits at the start)."""
    rises = []
    for history in curves.values():
        rate = [m["click_in_target"] for m in history]
        rises.append(f"{np.mean(rate[:window]):.3f} -> {np.mean(rate[-window:]):.3f}")
    return f"training episodes' click-in-target, mean of the first and last {window} GRPO steps: " + ", ".join(rises)


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("reward/total", "total reward"),
        ("iou", "IoU (train episodes)"),
        ("click_in_target", "click in target"),
        ("reward/format", "format reward"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys):
        for seed, history in curves.items():
            steps = np.array([m["step"] for m in history])
            values = np.array([m.get(key, np.nan) for m in history], dtype=float)
            (line,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
            # Each step's prompts differ in difficulty: the trend shows in a moving mean over `smooth` steps.
            smooth = min(10, len(values))
            if smooth > 1:
                mean = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
                ax.plot(steps[smooth - 1 :], mean, color=line.get_color(), label=f"seed {seed}")
            else:
                line.set_label(f"seed {seed}")
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_seed(seed: int, plan: Plan, out: Path, data: dict, held_out: HeldOut, step_mode: bool) -> dict:
    """One seed: build, evaluate untrained, SFT, evaluate, GRPO, evaluate, baselines; optionally a short step-mode run
    for its steps/s. Writes and returns seed<k>/results.json ({"results": {row: metrics}, "timing": {...}}); each
    evaluation's results.csv, masks and trajectories are in seed<k>/eval/<row> (the baselines' in eval/baselines)."""
    from ibisagent.testing import build_tiny_qwen2_5_vl

    t0 = time.perf_counter()
    root = out / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    # Phases whose output folder is complete are reused (an interrupted run continues); timings are kept per seed.
    saved = root / "timing.json"
    timing = json.loads(saved.read_text()) if saved.is_file() else {}
    results = {}
    if not (root / "init" / "config.json").is_file():
        build_tiny_qwen2_5_vl(
            root / "init", seed=seed, min_pixels=plan.pixels**2, max_pixels=plan.pixels**2, **plan.model
        )
    cases, evals = held_out.cases, root / "eval"
    results["untrained"] = evaluate_policy(
        load_policy(root / "init", data["templates"]), cases, plan.eval_max_steps, evals / "untrained"
    )
    if not (root / "sft-single" / "config.json").is_file():
        callbacks = None
        if plan.sft_probe_images:
            log = root / "probe.jsonl"
            log.unlink(missing_ok=True)
            probe = held_out_cases(data["shapes"], data["instructions"], "probe").cases
            callbacks = [grounding_stop(probe, data["templates"], plan.sft_probe_every, plan.sft_probe_target, log)]
        timing["sft_single_seconds"], timing["sft_single_steps"] = run_sft(
            root / "init",
            root / "sft-single",
            out / "traj-single",
            data,
            plan,
            plan.sft_single_steps,
            seed,
            plan.sft_lr,
            plan.sft_single_history,
            plan.sft_single_first_only,
            callbacks,
        )
        saved.write_text(json.dumps(timing))
    if not (root / "sft" / "config.json").is_file():
        timing["sft_multi_seconds"], _ = run_sft(
            root / "sft-single",
            root / "sft",
            out / "traj-multi",
            data,
            plan,
            plan.sft_multi_steps,
            seed,
            plan.sft_multi_lr,
        )
        timing.update(
            sft_seconds=timing.get("sft_single_seconds", 0.0) + timing["sft_multi_seconds"],
            sft_steps=timing.get("sft_single_steps", plan.sft_single_steps) + plan.sft_multi_steps,
        )
        saved.write_text(json.dumps(timing))
    results["SFT"] = evaluate_policy(
        load_policy(root / "sft", data["templates"]), cases, plan.eval_max_steps, evals / "SFT"
    )
    print(f"seed {seed} SFT: {results['SFT']}", flush=True)
    if not (root / "rl" / "config.json").is_file():
        t_rl = time.perf_counter()
        run_grpo(root / "sft", root / "rl", data, plan, seed, "multi_turn", plan.rl_steps, data["shapes"])
        rl_seconds = time.perf_counter() - t_rl
        timing.update(rl_seconds=rl_seconds, rl_steps_per_second=plan.rl_steps / rl_seconds)
        saved.write_text(json.dumps(timing))
    results["SFT+RL"] = evaluate_policy(
        load_policy(root / "rl", data["templates"]), cases, plan.eval_max_steps, evals / "SFT+RL"
    )
    print(f"seed {seed} SFT+RL: {results['SFT+RL']}", flush=True)
    results.update(evaluate_baselines(held_out, seed, plan.eval_max_steps, evals / "baselines"))
    if step_mode and plan.step_mode_steps and "step_mode_steps_per_second" not in timing:
        t_step = time.perf_counter()
        run_grpo(root / "sft", root / "rl-step", data, plan, seed, "step", plan.step_mode_steps, out / "traj-multi")
        timing["step_mode_steps_per_second"] = plan.step_mode_steps / (time.perf_counter() - t_step)
    timing["this_run_seconds"] = time.perf_counter() - t0
    timing["threads"] = os.environ.get("OMP_NUM_THREADS")
    saved.write_text(json.dumps(timing))
    record = {"results": results, "timing": timing}
    (root / "results.json").write_text(json.dumps(record, indent=1))
    print(f"seed {seed}: {timing}", flush=True)
    return record


def _run_parallel(argv: list[str], seeds: list[int], jobs: int, out: Path) -> None:
    """Each seed in its own process, `jobs` at a time, with the cores split between them: the tiny model's matrices
    are too small for several threads to help, so seeds side by side finish far sooner than one after another."""
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running = list(seeds), []
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            log = open(out / f"seed{seed}.log", "w")
            cmd = [sys.executable, __file__, *argv, "--seeds", str(seed), "--jobs", "1", "--worker"]
            if seed != seeds[0]:
                cmd.append("--no-step-mode")  # the step-mode timing is taken once, on the first seed
            running.append((seed, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode:
                for _, process, log in running:  # the other seeds' finished phases stay on disk for a rerun
                    process.terminate()
                    process.wait()
                    log.close()
                raise RuntimeError(f"seed {item[0]} failed (exit {item[1].returncode}); see {out}/seed{item[0]}.log")


def main(argv: list[str] | None = None) -> int:
    from ibisagent._compat import ensure_torchvision

    ensure_torchvision()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(PLANS), default="cpu")
    parser.add_argument("--out", default="learning-proof")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--override", default="{}", help="JSON of Plan fields to change, e.g. '{\"rl_steps\": 10}'")
    parser.add_argument(
        "--jobs", type=int, default=None, help="seeds run side by side (default: all; each gets cores / jobs threads)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-step-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = Plan(**{**PLANS[args.mode].__dict__, **json.loads(args.override)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = make_data(out, plan)
    held_out = held_out_cases(data["shapes"], data["instructions"])
    print(f"data: {len(held_out.cases)} held-out cases, {time.perf_counter() - t_start:.0f} s", flush=True)
    jobs = args.jobs or len(args.seeds)  # one thread each is as fast as two for this model: all at once is soonest
    if args.worker or jobs <= 1:
        records = {
            s: run_seed(s, plan, out, data, held_out, step_mode=s == args.seeds[0] and not args.no_step_mode)
            for s in args.seeds
        }
        if args.worker:
            return 0
    else:
        shared = ["--mode", args.mode, "--out", str(out), "--override", args.override]
        try:
            _run_parallel(shared, args.seeds, jobs, out)
        except RuntimeError as exc:
            print(f"learning proof: {exc}", file=sys.stderr)
            return 1
        records = {s: json.loads((out / f"seed{s}" / "results.json").read_text()) for s in args.seeds}

    results = {name: [records[s]["results"][name] for s in args.seeds] for name in records[args.seeds[0]]["results"]}
    timing = {s: records[s]["timing"] for s in args.seeds}
    curves = {}
    for s in args.seeds:
        lines = (out / f"seed{s}" / "rl" / "metrics.jsonl").read_text().splitlines()
        curves[s] = [json.loads(line) for line in lines if line.strip()]
    total = time.perf_counter() - t_start
    text = table(results)
    checks = criteria(results)
    text += "\n\n" + "\n".join(f"- {'met' if ok else 'NOT met'}: {line}" for line, ok in checks)
    speeds = {
        "multi-turn GRPO steps/s": [t.get("rl_steps_per_second") for t in timing.values()],
        "step-level GRPO steps/s": [t.get("step_mode_steps_per_second") for t in timing.values()],
    }
    for name, values in speeds.items():
        values = [v for v in values if v]
        if values:
            text += f"\n- {name}: " + ", ".join(f"{v:.3f}" for v in values)
    text += "\n- " + training_rise(curves)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "plan": plan.__dict__,
                "results": results,
                "timing": timing,
                "total_seconds": total,
                "jobs": jobs,
                "cores": os.cpu_count(),
                "cases": len(held_out.cases),
                "criteria": [{"check": line, "met": ok} for line, ok in checks],
            },
            indent=1,
        )
    )
    plot_curves(curves, out / "reward_curves.png")
    print(text)
    print(f"total {total / 60:.1f} min with {jobs} seed(s) side by side; timing per seed: {json.dumps(timing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cold-start SFT (paper 3.2): conversations built from simulated trajectories, loss on model-written tokens only,
trained with trl's `SFTTrainer` (optionally LoRA via peft, optionally a frozen vision tower).

A conversation is what the policy sees at inference, in the one chat format of `ibisagent.chat`: the system prompt,
then per step a user turn (the observation image: the image with the current masks overlaid, `ibisagent.render.overlay`,
and the prompt template's text) and the assistant turn (`<think>` reasoning, `<action>`, and `<answer>` when it terminates).
The instruction comes from the instruction library (`prompts.py`), the reasoning from the weight-free generator
(`reasoning.py`), the actions from the trajectory itself.

Loss masks: every token is masked (-100) except the assistant turns' content and end-of-turn token; the assistant
turns of a self-correction sample's wrong clicks are masked too (their `train` flag is False), so the policy sees
its mistake in context but never learns to make it.

Launch: `accelerate launch -m ibisagent_training.sft --config sft.yaml` (or `ibisagent-train sft ...`); the options
are this module's `SFTDataArguments`, trl's `SFTConfig` and trl's `ModelConfig`, from the command line or a yaml.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ibisagent._compat import ensure_torchvision
from ibisagent.chat import (
    END_OF_TURN,
    VISION_START,
    PromptTemplates,
    assistant_message,
    assistant_texts,
    observation_image,
    pixel_budget,
    system_message,
    user_message,
)
from ibisagent.grammar import Grammar
from ibisagent.io import read_image, read_mask
from ibisagent.policies.hf_vlm import ModelLoadError, load_pretrained
from ibisagent.render import overlay
from ibisagent.specs import HISTORY_MODES, PolicySpec
from ibisagent.types import Action

from .common import IGNORE_INDEX, collate, freeze_vision, pad_token_id, spec_field, spec_values
from .prompts import InstructionLibrary
from .reasoning import StepContext, describe_step, step_context, undo_context
from .records import TrajectoryRecord, iter_kept


# -- conversations -----------------------------------------------------------------------------------------------------
@dataclass
class Conversation:
    """One SFT sample: chat messages (image entries are `{"type": "image"}` placeholders), the observation images
    (HxWx3 uint8, in placeholder order), per assistant message in order whether its tokens are trained, and the
    instruction the conversation answers (what an episode of the policy would be given)."""

    id: str
    messages: list[dict]
    images: list[np.ndarray]
    train: list[bool]
    instruction: str = ""

    @property
    def assistant_texts(self) -> list[str]:
        return assistant_texts(self.messages)


class ConversationBuilder:
    """Turns trajectory records (`records.TrajectoryRecord`) into conversations, deterministically per record id and `seed`.

    library: `prompts.InstructionLibrary` (None: the packaged one). dialect: the grammar the assistant writes.
    template_dir: prompt templates as at inference (None: the packaged ones). history "full" builds one
    conversation per trajectory (every observation); "current" builds one per step (the system prompt, the
    current observation and the step's answer), matching `HFVLMPolicy(history=...)`. reasoning False leaves
    `<think>` empty (short targets for from-scratch experiments); decimals: digits of the written coordinates.
    """

    def __init__(
        self,
        library=None,
        dialect: str = "ibis",
        template_dir: str | Path | None = None,
        history: str = "full",
        seed: int = 0,
        reasoning: bool = True,
        decimals: int = 4,
    ):
        if history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {', '.join(HISTORY_MODES)}, got {history!r}")
        self.library = library or InstructionLibrary()
        if not 1 <= decimals <= 6:
            raise ValueError(f"decimals must be between 1 and 6, got {decimals}")
        self.grammar = Grammar(dialect, decimals=decimals)
        self.templates = PromptTemplates.load(dialect, template_dir)
        self.history = history
        self.seed = seed
        self.reasoning = reasoning

    def build(
        self,
        record: TrajectoryRecord,
        image: np.ndarray | None = None,
        gt: np.ndarray | None = None,
        only: int | None = None,
    ) -> list[Conversation]:
        """Conversations of one record. image (HxWx3 uint8) and gt (HxW bool) are read from the record's paths
        when not given. only: in "current" history, return just the `only`-th trained step's conversation (the
        text of every step is still drawn in order, so it is the same as in the full list; only its image is
        rendered)."""
        traj = record.load_trajectory()
        target, modality = record.target, record.modality
        image = read_image(record.image) if image is None else image
        gt = read_mask(record.mask, image.shape[:2]) if gt is None else gt
        rng = random.Random(f"{self.seed}:{record.id}:{record.variant}")
        instruction = self.library.initial(target, modality, rng).text
        size = traj.image_size
        masked = record.masked_steps

        empty = np.zeros(size, bool)
        shown, answers, train = [], [], []  # per step: the mask the agent sees, its answer, whether it is trained
        for k, step in enumerate(traj.steps):
            previous = traj.steps[k - 1] if k else None
            mask_now = previous.masks.get(target, empty) if previous else traj.initial_masks.get(target, empty)
            shown.append(mask_now)
            action = step.action
            if action is None:  # an unparseable turn cannot be trained on; oracle trajectories have none
                raise ValueError(f"record {record.id}: step {step.index} has no action ({step.error})")
            if action.undo:
                restored = step.masks.get(target, empty)
                own_clicks = previous.clicks.get(target, []) if previous else []
                if own_clicks:
                    ctx = undo_context(mask_now, restored, gt, target, modality, k, previous.action.clicks)
                else:  # nothing of its own to revert: it discards the mask it was given
                    ctx = undo_context(mask_now, restored, gt, target, modality, k)
                    ctx.kind = "discard"
            else:
                ctx = step_context(mask_now, gt, action.clicks, target, modality, k)
            think = describe_step(ctx, rng) if self.reasoning else ""
            answer = self.library.answer(target, modality, rng) if action.terminate else None
            answers.append(self.grammar.format(action, size, think=think, answer=answer))
            train.append(k not in masked)

        system = system_message(self.templates, instruction, [target])
        turns = [
            [user_message(self.templates, instruction, [target], first=k == 0), assistant_message(text)]
            for k, text in enumerate(answers)
        ]
        cid = f"{record.id}#{record.variant}"
        if self.history == "full":
            messages = [system, *(m for turn in turns for m in turn)]
            return [Conversation(cid, messages, [overlay(image, m) for m in shown], train, instruction)]
        steps = [k for k, ok in enumerate(train) if ok]
        if only is not None:
            steps = steps[only : only + 1]
        return [
            Conversation(f"{cid}@{k}", [system, *turns[k]], [overlay(image, shown[k])], [True], instruction)
            for k in steps
        ]

    def build_absent(
        self, record: TrajectoryRecord, absent_target: str, image: np.ndarray | None = None
    ) -> Conversation:
        """A question about `absent_target`, a structure not in this record's image, answered with a refusal and
        no click (Terminate)."""
        image = read_image(record.image) if image is None else image
        size = image.shape[:2]
        modality = record.modality
        rng = random.Random(f"{self.seed}:{record.id}:absent:{absent_target}")
        question, refusal = self.library.absent(absent_target, modality, rng)
        empty = np.zeros(size, bool)
        ctx = StepContext(size, empty, empty, (), absent_target, modality, 0, "absent")
        text = self.grammar.format(Action(terminate=True), size, think=describe_step(ctx, rng), answer=refusal)
        messages = [
            system_message(self.templates, question, [absent_target]),
            user_message(self.templates, question, [absent_target], first=True),
            assistant_message(text),
        ]
        return Conversation(f"{record.id}#absent:{absent_target}", messages, [image], [True], question)


# -- tokens and loss masks ---------------------------------------------------------------------------------------------
def encode(processor, conv: Conversation, image_kwargs: dict | None = None) -> dict:
    """Token ids, attention mask, labels and image tensors of one conversation, as the model's forward pass takes
    them (batch dimension of 1 for ids; pixel_values / image_grid_thw for all images).

    The chat template renders the whole conversation; each assistant turn's content plus the end-of-turn token that
    follows it (`END_OF_TURN`) is tokenised on its own, exactly as generation produces it after
    the `assistant` header, and labelled when its `train` flag is set; all other text is tokenised with its images
    (placeholders expanded by the processor) and labelled -100.
    """
    import torch

    text = processor.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=False)
    segments, pos = [], 0
    for content, trained in zip(conv.assistant_texts, conv.train):
        start = text.find(content, pos)
        if start < 0:
            raise ValueError(
                f"{conv.id}: the chat template changed an assistant turn; cannot locate it for the loss mask"
            )
        end = start + len(content)
        stop = end + len(END_OF_TURN) if text.startswith(END_OF_TURN, end) else end
        segments += [(text[pos:start], False, False), (text[start:stop], True, trained)]
        pos = stop
    segments.append((text[pos:], False, False))

    images = iter(observation_image(im) for im in conv.images)
    ids, labels, pixel_values, grids = [], [], [], []
    for seg, is_assistant, trained in segments:
        if not seg:
            continue
        n_images = 0 if is_assistant else seg.count(VISION_START)
        if not n_images:  # text alone: the tokenizer is the processor's text path, without its per-call overhead
            seg_ids = processor.tokenizer(seg, add_special_tokens=False)["input_ids"]
        else:
            seg_images = [next(images) for _ in range(n_images)]
            out = processor(text=[seg], images=seg_images, return_tensors="pt", **(image_kwargs or {}))
            seg_ids = out["input_ids"][0].tolist()
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        ids += seg_ids
        labels += seg_ids if trained else [IGNORE_INDEX] * len(seg_ids)
    if next(images, None) is not None:
        raise ValueError(f"{conv.id}: more images than image placeholders in the rendered conversation")
    out = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    if pixel_values:
        out["pixel_values"] = torch.cat(pixel_values)
        out["image_grid_thw"] = torch.cat(grids)
    return out


class SFTDataset:
    """A map-style dataset of encoded conversations built lazily from trajectory records.

    Conversations are listed once (cheap: no pixels read); each item reads its image and mask, renders the
    observations and tokenises on access, so memory stays flat however large the record files are.
    first_step_only (history "current" only): one sample per record, its first trained step (the click made on the
    bare image), a curriculum phase for learning where to click before when to stop.
    """

    def __init__(
        self,
        records: list[TrajectoryRecord],
        processor,
        builder: ConversationBuilder,
        absent_fraction: float = 0.0,
        image_kwargs: dict | None = None,
        first_step_only: bool = False,
    ):
        if first_step_only and builder.history != "current":
            raise ValueError(
                f"first_step_only needs history 'current' (one sample per step), got {builder.history!r}; "
                "set history to 'current' or leave first_step_only off"
            )
        self.processor, self.builder, self.image_kwargs = processor, builder, image_kwargs
        self.items: list[tuple[int, str | None, int]] = []  # (record index, absent target, conversation index)
        rng = random.Random(builder.seed)
        targets = sorted({r.target for r in records})
        image_targets: dict[str, set] = {}
        for r in records:
            image_targets.setdefault(r.image, set()).add(r.target)
        for i, r in enumerate(records):
            n = len(r.trained_steps) if builder.history == "current" else 1
            n = min(n, 1) if first_step_only else n
            self.items += [(i, None, k) for k in range(n)]
        for i, r in enumerate(records):
            others = [t for t in targets if t not in image_targets[r.image]]
            if r.variant == "gold" and others and rng.random() < absent_fraction:
                self.items.append((i, rng.choice(others), 0))
        self.records = records

    def __len__(self) -> int:
        return len(self.items)

    def conversation(self, index: int) -> Conversation:
        i, absent, k = self.items[index]
        if absent is not None:
            return self.builder.build_absent(self.records[i], absent)
        if self.builder.history == "current":
            return self.builder.build(self.records[i], only=k)[0]
        return self.builder.build(self.records[i])[0]

    def __getitem__(self, index: int) -> dict:
        return encode(self.processor, self.conversation(index), self.image_kwargs)

    def to_hf(self):
        """The same items as a Hugging Face `datasets.Dataset` (what trl's trainers take): a column of indices with
        an on-access transform that builds and encodes the conversation."""
        import datasets

        return datasets.Dataset.from_dict({"index": list(range(len(self)))}).with_transform(self._encode_batch)

    def _encode_batch(self, batch: dict) -> dict:
        encoded = [self[i] for i in batch["index"]]
        return {key: [e.get(key) for e in encoded] for key in encoded[0]}


# -- training ----------------------------------------------------------------------------------------------------------
@dataclass
class SFTDataArguments:
    """Where the SFT data comes from and how conversations are built (the rest is trl's SFTConfig / ModelConfig).

    The chat options are the inference policy's (`PolicySpec` fields: dialect, history, template_dir, min_pixels,
    max_pixels), so that `policy_spec(model)` is the policy that sees what this data trains; the policy's model and
    dtype are trl's `--model_name_or_path` and `--dtype` here, its decoding options have no meaning in SFT.
    """

    trajectories: str = field(default="", metadata={"help": "output folder of `ibisagent-train trajectories`"})
    variants: str = field(
        default="gold,self_correction,user_inconsistency", metadata={"help": "record variants to train on"}
    )
    history: str = spec_field(
        PolicySpec, "history", help="full: one conversation per trajectory; current: one per step (as the policy)"
    )
    first_step_only: bool = field(
        default=False, metadata={"help": "with history current: only each trajectory's first trained step"}
    )
    dialect: str = spec_field(PolicySpec, "dialect")
    template_dir: str | None = spec_field(PolicySpec, "template_dir")
    absent_fraction: float = field(default=0.1, metadata={"help": "extra absent-target questions per gold record"})
    max_records: int | None = field(default=None, metadata={"help": "use at most this many records"})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "train the language model (and merger) only"})
    min_pixels: int | None = spec_field(PolicySpec, "min_pixels")
    max_pixels: int | None = spec_field(PolicySpec, "max_pixels")
    build_seed: int = field(default=0, metadata={"help": "seed of instruction/reasoning/answer choices"})
    instructions: str | None = field(
        default=None, metadata={"help": "instruction library file (json/yaml, prompts.InstructionLibrary.from_file)"}
    )
    reasoning: bool = field(default=True, metadata={"help": "write <think> reasoning (False: empty <think>)"})
    decimals: int = field(default=4, metadata={"help": "decimals of the coordinates the assistant writes"})

    def __post_init__(self) -> None:
        self.policy_spec()  # checks the chat options

    def policy_spec(self, model: str | None = None) -> PolicySpec:
        """The inference policy whose conversations this data reproduces (greedy decoding by default)."""
        return PolicySpec(model=model, **spec_values(PolicySpec, self))


def load_records(folder: str | Path, variants: list[str], max_records: int | None = None) -> list[TrajectoryRecord]:
    """The kept records of `variants` in a trajectories folder (at most `max_records`, in file order)."""
    records = list(iter_kept(folder, variants))
    if not records:
        raise ValueError(f"{folder}: no kept trajectory records of variants {variants}; generate them first")
    return records[:max_records]


def build_trainer(data_args: SFTDataArguments, training_args, model_args, callbacks=None):
    """The trl `SFTTrainer` for these arguments: model and processor from `model_args.model_name_or_path`, LoRA when
    `model_args.use_peft`, our dataset and collator (`skip_prepare_dataset`: the loss masks are ours)."""
    ensure_torchvision()  # before transformers/trl import torchvision (CPU-only torch, see ibisagent/_compat.py)
    from trl import SFTTrainer, get_peft_config

    if not data_args.trajectories:
        raise ValueError("give --trajectories: the output folder of `ibisagent-train trajectories`")
    records = load_records(data_args.trajectories, data_args.variants.split(","), data_args.max_records)
    source = model_args.model_name_or_path
    resume = training_args.resume_from_checkpoint
    if resume and not model_args.use_peft and (Path(resume) / "config.json").is_file():
        # Trainer's own reload of a full checkpoint misses Qwen2.5-VL's renamed weight keys under transformers 5 (the
        # resumed run restarted from the initial weights with the restored optimizer); from_pretrained maps them.
        source = resume
    model, processor = load_pretrained(
        source, model_args.dtype, model_args.model_revision, model_args.attn_implementation
    )
    if data_args.freeze_vision_tower:
        freeze_vision(model)
    image_kwargs = pixel_budget(processor, data_args.min_pixels, data_args.max_pixels)
    builder = ConversationBuilder(
        library=InstructionLibrary.from_file(data_args.instructions) if data_args.instructions else None,
        dialect=data_args.dialect,
        template_dir=data_args.template_dir,
        history=data_args.history,
        seed=data_args.build_seed,
        reasoning=data_args.reasoning,
        decimals=data_args.decimals,
    )
    dataset = SFTDataset(
        records, processor, builder, data_args.absent_fraction, image_kwargs, data_args.first_step_only
    )
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    training_args.remove_unused_columns = False
    pad = pad_token_id(processor)
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset.to_hf(),
        data_collator=lambda batch: collate(batch, pad),
        processing_class=processor,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )


def main(argv: list[str] | None = None) -> int:
    ensure_torchvision()
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((SFTDataArguments, SFTConfig, ModelConfig), prog="ibisagent-train sft")
    try:
        data_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    except ValueError as exc:  # trl/transformers validate their configs with ValueError (e.g. bf16 on a CPU)
        print(f"ibisagent-train sft: error: {exc}", file=sys.stderr)
        return 2
    if not model_args.model_name_or_path:
        print("ibisagent-train sft: error: give --model_name_or_path (a local folder or hub id)", file=sys.stderr)
        return 2
    try:
        trainer = build_trainer(data_args, training_args, model_args)
    except (OSError, ValueError, ModelLoadError) as exc:  # missing data, a model that cannot be loaded, bad options
        print(f"ibisagent-train sft: error: {exc}", file=sys.stderr)
        return 2
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

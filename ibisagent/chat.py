"""The one chat format: prompt templates, the messages of each turn, where the observation image goes, the pixel
budget, the Qwen special tokens, and how a turn ends and the next one opens.

The Hugging Face policy (`ibisagent.policies.hf_vlm`), SFT (`ibisagent_training.sft`) and GRPO rollouts
(`ibisagent_training.grpo`) all build their conversations here, so that what a model is trained on is what it sees
at inference (tests/test_chat.py proves it token for token and pixel for pixel). This module imports no torch or
transformers; functions that take a `processor` only call its methods.

A conversation is a list of messages in the Hugging Face chat format: the system message (the system template), then
per step a user message (an image placeholder `{"type": "image"}`, then the first template's text before any action,
the refine template's after) and an assistant message (the model's text). The images travel separately, in
placeholder order, as RGB PIL images of the observation (HxWx3 uint8: the image with the current masks overlaid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ibisagent.grammar import DIALECTS
from ibisagent.policies.base import Observation

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_PARTS = ("system", "first", "refine")
TEMPLATE_FIELDS = ("instruction", "targets")

# Qwen2.5-VL's special tokens, in the order the real tokenizer numbers them (relative order, not the real ids).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
END_OF_TURN = "<|im_end|>"  # closes every turn in Qwen's chat templates; the model must learn to write it
VISION_START = "<|vision_start|>"  # opens each image's placeholder run in a rendered conversation
# Model config attributes naming the vision placeholder ids, which a model must never write.
VISION_TOKEN_ATTRS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


# -- templates -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplates:
    """The three prompt texts of one dialect, as Python `str.format` templates with the fields {instruction} (the
    user's request) and {targets} (the target names, comma-separated). Literal braces are written {{ and }}.

    system: the system prompt. first: the user text of the first turn (no action applied yet; the image, with an
    initial mask if the episode refines one, precedes it). refine: the user text of every later turn.
    """

    system: str
    first: str
    refine: str
    dialect: str = "ibis"
    source: str = ""

    @classmethod
    def load(cls, dialect: str = "ibis", template_dir: str | Path | None = None) -> PromptTemplates:
        """Read `<dialect>_system.txt`, `<dialect>_first.txt` and `<dialect>_refine.txt`.

        template_dir: a folder whose files replace the packaged ones (`ibisagent/templates/`); it must hold at least
        one of the three, and the packaged file is used for any it lacks. One trailing newline of a file is dropped.
        """
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; choose one of {', '.join(DIALECTS)}")
        names = {part: f"{dialect}_{part}.txt" for part in TEMPLATE_PARTS}
        paths = {part: TEMPLATE_DIR / name for part, name in names.items()}
        source = str(TEMPLATE_DIR)
        if template_dir is not None:
            folder = Path(template_dir).expanduser()
            if not folder.is_dir():
                raise ValueError(f"template_dir {str(folder)!r} is not a directory")
            found = {part: folder / name for part, name in names.items() if (folder / name).is_file()}
            if not found:
                raise ValueError(
                    f"template_dir {str(folder)!r} holds none of {', '.join(names.values())}; "
                    f"copy them from {TEMPLATE_DIR} and edit them there"
                )
            paths.update(found)
            source = str(folder)
        texts = {}
        for part, path in paths.items():
            text = path.read_text(encoding="utf-8")
            texts[part] = text.removesuffix("\n")
            _check_fields(texts[part], path)
        return cls(texts["system"], texts["first"], texts["refine"], dialect, source)

    def system_text(self, instruction: str, targets: list[str]) -> str:
        return self.system.format(**_fields(instruction, targets))

    def user_text(self, instruction: str, targets: list[str], first: bool, feedback: str | None = None) -> str:
        """The user turn's text; `feedback` (why the previous output was unusable) is appended after a blank line."""
        text = (self.first if first else self.refine).format(**_fields(instruction, targets))
        return f"{text}\n\n{feedback}" if feedback else text


def _fields(instruction: str, targets: list[str]) -> dict[str, str]:
    return {"instruction": instruction, "targets": ", ".join(targets) if targets else "target"}


def _check_fields(text: str, path: Path) -> None:
    try:
        text.format(**{name: "" for name in TEMPLATE_FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"prompt template {path} is not a valid str.format template ({type(exc).__name__}: {exc}); "
            f"the only fields are {{instruction}} and {{targets}}, and literal braces are written {{{{ and }}}}"
        ) from None


# -- messages --------------------------------------------------------------------------------------------------------
def system_message(templates: PromptTemplates, instruction: str, targets: list[str]) -> dict:
    """The system message of an episode."""
    return {"role": "system", "content": [{"type": "text", "text": templates.system_text(instruction, targets)}]}


def user_message(
    templates: PromptTemplates, instruction: str, targets: list[str], first: bool, feedback: str | None = None
) -> dict:
    """A user turn: the observation image's placeholder, then the first (first=True) or refine template's text."""
    text = templates.user_text(instruction, targets, first=first, feedback=feedback)
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def assistant_message(text: str) -> dict:
    """A model turn holding `text` (`<think>`, `<action>` and optionally `<answer>`)."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def assistant_texts(messages: list[dict]) -> list[str]:
    """The texts of the assistant messages, in order."""
    return [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]


def observation_image(image: np.ndarray) -> Image.Image:
    """The RGB PIL image a model is shown for an HxWx3 uint8 observation array."""
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")


def turn_messages(templates: PromptTemplates, obs: Observation) -> tuple[dict, dict, Image.Image]:
    """The system message, the user message of `obs` (first template while no action has been applied, i.e.
    obs.step == 0, refine after; obs.feedback appended) and the observation image as RGB PIL."""
    system = system_message(templates, obs.instruction, obs.targets)
    user = user_message(templates, obs.instruction, obs.targets, first=obs.step == 0, feedback=obs.feedback)
    return system, user, observation_image(obs.image)


# -- processor-side rules --------------------------------------------------------------------------------------------
def pixel_budget(processor: Any, min_pixels: int | None, max_pixels: int | None) -> dict:
    """Per-call image-processor options for a pixel budget (Qwen2-VL's processors call the bounds shortest_edge and
    longest_edge of `size`, both in pixels of area); a bound left None keeps the processor's own."""
    if min_pixels is None and max_pixels is None:
        return {}
    size = getattr(processor.image_processor, "size", None) or {}
    lo = min_pixels if min_pixels is not None else size.get("shortest_edge")
    hi = max_pixels if max_pixels is not None else size.get("longest_edge")
    return {"images_kwargs": {"size": {"shortest_edge": lo, "longest_edge": hi}}}


def turn_boundaries(processor: Any) -> tuple[str, Callable[[dict], str]]:
    """(the template's text that closes an assistant turn, a function rendering a new user turn plus the generation
    prompt), taken from the processor's chat template itself by rendering a conversation with and without one more
    turn. A token-in, token-out rollout appends these to the ids it already holds instead of re-rendering."""
    marker = "\x00"
    system = {"role": "system", "content": [{"type": "text", "text": "s"}]}
    user = {"role": "user", "content": [{"type": "text", "text": "u"}]}
    assistant = assistant_message(marker)
    prefix = processor.apply_chat_template([system, user, assistant], tokenize=False)
    close = prefix[prefix.rindex(marker) + 1 :]

    def open_turn(message: dict) -> str:
        full = processor.apply_chat_template(
            [system, user, assistant, message], tokenize=False, add_generation_prompt=True
        )
        return full[len(prefix) :]

    return close, open_turn


def generation_kwargs(
    model: Any,
    processor: Any,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
) -> dict:
    """`generate` keyword arguments that end a turn at END_OF_TURN (besides the model's own eos ids) and pass every
    sampling setting explicitly, so that a checkpoint's generation_config (Qwen ships top_k=1,
    repetition_penalty=1.05) cannot silently change what the caller asked for. The vision placeholder tokens are
    suppressed: a written <|image_pad|> would be an image slot without features in the next turn's prompt."""
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    im_end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in eos:
        eos.append(im_end)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": eos or None,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [None])[0],
        "repetition_penalty": repetition_penalty,
    }
    config = model.config
    vision = [int(getattr(config, n)) for n in VISION_TOKEN_ATTRS if getattr(config, n, None) is not None]
    if vision:
        kwargs["suppress_tokens"] = vision
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return kwargs

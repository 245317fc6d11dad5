"""What SFT and GRPO share: the label value that masks a token out of the loss, batch padding, vision-tower freezing,
the pad id, and the fields their configs take from the core's policy spec. The model itself is loaded by the one checkpoint loader, `ibisagent.policies.hf_vlm.load_pretrained`,
as the policy loads it at inference. torch is imported inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any

IGNORE_INDEX = -100  # the label of a token that is not trained (observation, system prompt, masked turn)


def pad_token_id(processor: Any) -> int | None:
    """The id that pads a batch: the tokenizer's pad token, else its eos token (Qwen's tokenizers have both)."""
    tokenizer = processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad ids (pad_token_id), attention masks (0) and labels (IGNORE_INDEX) to the longest sequence, giving
    (B, L) LongTensors; concatenate image tensors (pixel_values, image_grid_thw) in batch order."""
    import torch

    n = max(len(b["input_ids"]) for b in batch)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(b[key], (0, n - len(b[key])), value=value) for b in batch])

    out = {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
    }
    with_images = [b for b in batch if "pixel_values" in b]
    if with_images:
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in with_images])
        out["image_grid_thw"] = torch.cat([b["image_grid_thw"] for b in with_images])
    return out


def freeze_vision(model) -> int:
    """Freeze the vision encoder's blocks and patch embedding (the merger that projects into the language model
    stays trainable). Returns the number of frozen parameters."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no `visual` tower to freeze")
    frozen = 0
    for name, p in visual.named_parameters():
        if not name.startswith("merger"):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def spec_field(spec: type, name: str, default: Any = MISSING, help: str | None = None) -> Field:
    """A config field declared as the field `name` of the spec dataclass `spec` (its default, help and choices), for
    a training config that shares some of a spec's options but not all (so it cannot inherit the spec whole).
    `default` and `help` replace the spec's where the config's use of the option differs; say why beside the call."""
    found = {f.name: f for f in fields(spec)}
    if name not in found:
        raise ValueError(f"{spec.__name__} has no field {name!r}; its fields are {', '.join(found)}")
    metadata = dict(found[name].metadata)
    if help is not None:
        metadata["help"] = help
    return field(default=found[name].default if default is MISSING else default, metadata=metadata)


def spec_values(spec: type, config: Any) -> dict[str, Any]:
    """The values `config` holds for fields of the spec dataclass `spec` (those it declares with `spec_field`, or
    inherits), by field name: the keyword arguments that rebuild that part of the spec."""
    return {f.name: getattr(config, f.name) for f in fields(spec) if hasattr(config, f.name)}

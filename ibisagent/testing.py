"""A tiny Qwen2.5-VL built from configs, fully offline: random weights, for tests and from-scratch experiments.

It has the real architecture (vision tower with window attention, 3D M-RoPE, the Qwen chat format and image
placeholders) at about 0.2M parameters by default, so everything that loads, prompts, generates or trains a Qwen2.5-VL
policy can run on a CPU without downloading anything. Its outputs are noise until trained.
"""

from __future__ import annotations

from pathlib import Path

from ibisagent._compat import ensure_torchvision
from ibisagent.chat import END_OF_TURN, QWEN_SPECIAL_TOKENS

# The grammar's section tags (ibisagent.grammar). With a byte-level vocabulary each tag would cost 7-9 tokens;
# as single (non-special) tokens they survive `skip_special_tokens` decoding, shorten prompts and targets, and give
# a from-scratch model one decision per tag instead of nine. The released Qwen2.5-VL tokenizer has no such tokens,
# so pass `grammar_tokens=False` to mimic its tokenisation more closely.
GRAMMAR_TOKENS = ("<think>", "</think>", "<action>", "</action>", "<answer>", "</answer>")

# Qwen2.5-VL-Instruct's chat template (tokenizer_config.json of the Qwen release; trl ships the same text as
# trl/chat_templates/qwen2_5_vl.jinja). Used only when trl is not installed.
_QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def qwen2_5_vl_chat_template() -> str:
    """The Qwen2.5-VL chat template text: trl's packaged copy when trl is installed, else the identical copy here."""
    try:
        from importlib.resources import files

        return files("trl").joinpath("chat_templates", "qwen2_5_vl.jinja").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return _QWEN2_5_VL_CHAT_TEMPLATE


def build_tiny_tokenizer(grammar_tokens: bool = True):
    """A byte-level `Qwen2Tokenizer` with no merges: ids 0-255 are the bytes (in the GPT-2 ByteLevel alphabet, so id
    == byte value), 256-262 the Qwen special tokens in QWEN_SPECIAL_TOKENS order, then (optionally) the grammar tags
    (263-268). Any UTF-8 text round-trips; each byte is one token."""
    ensure_torchvision()
    from transformers import AddedToken, Qwen2Tokenizer

    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards, in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    # Special tokens get fixed ids after the bytes (the constructor would otherwise number eos/pad first).
    vocab.update({t: 256 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token=END_OF_TURN,
        pad_token="<|endoftext|>",
        errors="replace",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]}
    )
    if grammar_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in GRAMMAR_TOKENS])
    tokenizer.model_max_length = 32768
    return tokenizer


def build_tiny_qwen2_5_vl(
    out_dir: str | Path | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_num_heads: int = 2,
    vision_intermediate_size: int = 64,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    grammar_tokens: bool = True,
    rope_theta: float = 1000000.0,
):
    """Build a tiny Qwen2.5-VL: random weights, for tests and from-scratch experiments.

    Returns (model, processor): a float32 `Qwen2_5_VLForConditionalGeneration` in eval mode and a
    `Qwen2_5_VLProcessor` (byte-level tokenizer, see `build_tiny_tokenizer`; a `Qwen2VLImageProcessor` that resizes
    every image to between `min_pixels` and `max_pixels` pixels, i.e. at most max_pixels / 28**2 image tokens; the
    Qwen2.5-VL chat template). The head dimension is hidden_size / num_attention_heads and must be divisible by 4
    (M-RoPE splits its halves into temporal/height/width sections).

    rope_theta: the rotary base. Qwen's 1e6 leaves the height/width sections (the lowest frequencies) turning by
    hundredths of a radian per image row at small head sizes, so a small model trained from scratch hardly sees
    where an image token lies; a base near 10 makes neighbouring rows and columns distinguishable.

    out_dir: when given, both are saved there with `save_pretrained`, so that `AutoProcessor.from_pretrained(out_dir)`
    and `AutoModelForImageTextToText.from_pretrained(out_dir)` (or `HFVLMPolicy.from_pretrained(out_dir)`) load them.
    """
    ensure_torchvision()
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_attention_heads {num_attention_heads}")
    head_dim = hidden_size // num_attention_heads
    if head_dim % 4:
        raise ValueError(f"head_dim = hidden_size / num_attention_heads = {head_dim} must be divisible by 4 for M-RoPE")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads")
    if vision_hidden_size % vision_num_heads or (vision_hidden_size // vision_num_heads) % 4:
        raise ValueError("vision_hidden_size / vision_num_heads must be a multiple of 4 (2D rotary embedding)")

    tokenizer = build_tiny_tokenizer(grammar_tokens)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    # M-RoPE splits the head_dim / 2 rotary frequencies into temporal, height and width sections; the real model
    # uses [16, 24, 24] of 64 (1/4, 3/8, 3/8), and the sections must sum to head_dim / 2.
    half = head_dim // 2
    temporal = half // 4 + half % 4
    mrope_section = [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": float(rope_theta),
                "mrope_section": mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_intermediate_size,
            "num_heads": vision_num_heads,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.eval()

    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    # The processor insists on a video processor; the policy never sends videos.
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=qwen2_5_vl_chat_template(),
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor

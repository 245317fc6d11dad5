"""The Hugging Face vision-language policy: a Qwen2.5-VL-style model (any `AutoModelForImageTextToText` with a chat
template) that looks at the overlay image and writes the next `<think>`/`<action>` turn.

The conversation (templates, turn messages, images, pixel budget, end of turn) is the one chat format of
`ibisagent.chat`. `load_pretrained` is the one loader of a checkpoint, used here and by SFT and GRPO. transformers and
torch are imported inside this module's functions only.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ibisagent._compat import ensure_torchvision
from ibisagent.chat import PromptTemplates, assistant_message, generation_kwargs, pixel_budget, turn_messages
from ibisagent.policies.base import Observation
from ibisagent.specs import DTYPES, HISTORY_MODES

_CACHE_REUSE_MODEL_TYPES = ("qwen2_5_vl",)
# owner/name, as the Hub spells repository ids (no leading dot or slash, exactly one slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# -- the policy -----------------------------------------------------------------------------------------------------
class HFVLMPolicy:
    """A vision-language model as a policy (see `ibisagent.policies.base.Policy`).

    Each call to `act` shows the model the observation's overlay image (HxWx3 uint8, the current masks blended in
    green) and a user text from the templates, generates, and returns only the new text (special tokens removed).

    history: "full" keeps the whole episode in the conversation (every earlier image, user text and model answer;
             the paper's formulation); "current" sends only the system prompt and the current user turn (the
             released inference's default, use_history=0).
    reuse_cache: in "full" mode, keep the KV cache of the previous turns and prefill only what is new (the new
             user turn, its image, and any tail of the previous answer that does not re-tokenise to the generated
             tokens). Qwen2.5-VL only; other models recompute. On the tiny float32 model the outputs are identical
             to recomputation (tests/policies/test_hf_vlm.py); in low precision the cached and recomputed prefixes
             differ by rounding, as with any KV cache, which can flip a near-tied token.
    do_sample, temperature, top_p, top_k (0: off), repetition_penalty, max_new_tokens: passed to `generate`
             explicitly, so a checkpoint's generation_config (Qwen ships top_k=1, repetition_penalty=1.05) does not
             silently override them.
    min_pixels, max_pixels: the image processor's pixel budget per image (None: the processor's own setting).

    After each `act`: `last_prompt` is the rendered chat text, `last_stats` a dict of prompt_tokens, prefill_tokens
    (those run through the model before the first new token), reused_tokens (taken from the cache), new_tokens,
    images (in the prompt), seconds and step; `episode_stats` lists them for the episode.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        dialect: str = "ibis",
        history: str = "full",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        max_new_tokens: int = 512,
        template_dir: str | Path | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        seed: int | None = None,
        reuse_cache: bool = True,
    ):
        if history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {', '.join(HISTORY_MODES)}, got {history!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if processor is None or getattr(processor, "chat_template", None) is None:
            raise ValueError(
                "the processor has no chat template; load the processor of an instruction-tuned checkpoint "
                "(it ships chat_template.jinja or a chat_template in its config)"
            )
        self.model = model
        self.processor = processor
        self.dialect = dialect
        self.templates = PromptTemplates.load(dialect, template_dir)
        self.history = history
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.repetition_penalty = repetition_penalty
        self.max_new_tokens = max_new_tokens
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.seed = seed
        self.reuse_cache = reuse_cache
        self.last_stats: dict[str, Any] = {}
        self.last_prompt: str = ""
        self.episode_stats: list[dict[str, Any]] = []
        self._turns: list[dict] = []  # user/assistant messages of this episode (full history)
        self._images: list[Any] = []  # PIL images of the user turns in self._turns, in order
        self._cache = None  # KV cache after the previous generate call (full history + reuse_cache)
        self._cache_ids = None  # 1-D LongTensor: the token ids the cache holds keys/values for
        self._episode, self._calls = 0, 0  # start() counts episodes; they and the calls seed the sampling

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        dialect: str = "ibis",
        history: str = "full",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        device: str = "cpu",
        dtype: str = "auto",
        template_dir: str | Path | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> HFVLMPolicy:
        """Load a checkpoint with `AutoModelForImageTextToText` and `AutoProcessor`.

        model:  a local directory (holding config.json, the weights and the processor files) or a Hub id such as
                "Qwen/Qwen2.5-VL-7B-Instruct" (fetched into, or read from, the Hugging Face cache).
        device: a torch device string ("cpu", "cuda", "cuda:1"). dtype: "auto" (the checkpoint's), "bfloat16",
                "float16" or "float32".
        Further keyword arguments (top_k, repetition_penalty, reuse_cache) go to the constructor.
        """
        vlm, processor = load_pretrained(model, dtype)
        vlm.to(device)
        vlm.eval()
        return cls(
            vlm,
            processor,
            dialect=dialect,
            history=history,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            template_dir=template_dir,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            seed=seed,
            **kwargs,
        )

    # -- Policy protocol ------------------------------------------------------------------------------------------
    def start(self, instruction: str, targets: list[str]) -> None:
        """Forget the conversation and the KV cache; the prompts take the instruction and targets from each
        observation."""
        self._turns, self._images = [], []
        self._cache, self._cache_ids = None, None
        self.episode_stats = []
        self._episode += 1
        self._calls = 0

    def act(self, obs: Observation) -> str:
        """Generate the next turn for `obs` and return its text (new tokens only, special tokens skipped)."""
        t0 = time.perf_counter()
        messages, images, user = self.build_messages(obs)
        self.last_prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[self.last_prompt], images=images, return_tensors="pt", **self._image_kwargs())
        new_ids, stats = self._generate(inputs, len(images))
        text = self.processor.tokenizer.decode(new_ids, skip_special_tokens=True)
        if self.history == "full":
            self._turns += [user, assistant_message(text)]
            self._images.append(images[-1])
        self._calls += 1
        stats.update(seconds=time.perf_counter() - t0, step=obs.step)
        self.last_stats = stats
        self.episode_stats.append(stats)
        return text

    # -- prompts ----------------------------------------------------------------------------------------------------
    def build_messages(self, obs: Observation) -> tuple[list[dict], list[Any], dict]:
        """The chat messages the model sees for `obs`, the PIL images in placeholder order, and the new user message.

        The first template is used while no action has been applied (obs.step == 0), the refine template after.
        Image content entries are `{"type": "image"}` placeholders; the images travel separately to the processor.
        """
        system, user, image = turn_messages(self.templates, obs)
        if self.history == "full":
            return [system, *self._turns, user], [*self._images, image], user
        return [system, user], [image], user

    @property
    def conversation(self) -> list[dict]:
        """The user/assistant messages of the current episode so far (full history mode; empty otherwise)."""
        return list(self._turns)

    def _image_kwargs(self) -> dict:
        return pixel_budget(self.processor, self.min_pixels, self.max_pixels)

    # -- generation -------------------------------------------------------------------------------------------------
    def _generation_kwargs(self) -> dict:
        return generation_kwargs(
            self.model,
            self.processor,
            self.max_new_tokens,
            self.do_sample,
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
        )

    def _generate(self, inputs, num_images: int):
        import torch

        device = self.model.device
        inputs = inputs.to(device)
        prompt_len = int(inputs["input_ids"].shape[1])
        keep_cache = self.history == "full" and self.reuse_cache and self._can_reuse_cache()
        reuse = self._reusable_prefix(inputs) if keep_cache else 0
        cache, self._cache, self._cache_ids = self._cache, None, None  # generate() mutates it; restored on success
        kwargs = self._generation_kwargs()
        if reuse:
            cache.crop(-(cache.get_seq_length() - reuse))  # transformers 5: a negative count of tokens to drop
            model_inputs = self._continuation_inputs(inputs, reuse)
            kwargs["cache"] = cache
        else:
            model_inputs = dict(inputs)
        with torch.inference_mode(), _seeded(self._call_seed(), device):
            out = self.model.generate(**model_inputs, **kwargs, return_dict_in_generate=True, use_cache=True)
        sequence = out.sequences[0]
        new_ids = sequence[prompt_len:]
        if keep_cache and getattr(out, "cache", None) is not None:
            # The cache holds every token but the last one generated (it was sampled, never fed back).
            self._cache = out.cache
            self._cache_ids = sequence[: out.cache.get_seq_length()].clone()
        stats = {
            "prompt_tokens": prompt_len,
            "prefill_tokens": prompt_len - reuse,
            "reused_tokens": reuse,
            "new_tokens": int(new_ids.shape[0]),
            "images": num_images,
        }
        return new_ids.tolist(), stats

    def _can_reuse_cache(self) -> bool:
        # Continuing from a cache needs the model's own handling of 3D positions and pre-encoded image features in
        # generate(); that is verified (identical outputs, tests/policies/test_hf_vlm.py) for Qwen2.5-VL only.
        # Other architectures recompute the whole conversation each turn.
        return getattr(self.model.config, "model_type", None) in _CACHE_REUSE_MODEL_TYPES

    def _reusable_prefix(self, inputs) -> int:
        """How many leading tokens of this prompt the previous call's KV cache holds correctly.

        That is the longest common prefix of the cached ids (previous prompt + generated tokens) and the new ids,
        which differ where the model's tokens do not re-tokenise to themselves (special tokens it wrote, a
        non-canonical BPE split, no <|im_end|> at max_new_tokens). The prefix never ends inside an image's
        placeholder run (its features would be split), and keeps at least one token to prefill.
        """
        if self._cache is None or self._cache_ids is None:
            return 0
        ids = inputs["input_ids"][0]
        cached = self._cache_ids.to(ids.device)
        n = min(int(cached.shape[0]), int(ids.shape[0]) - 1)
        if n <= 0:
            return 0
        differ = (cached[:n] != ids[:n]).nonzero()
        reuse = int(differ[0, 0]) if differ.numel() else n
        image_id = self.model.config.image_token_id
        if 0 < reuse < ids.shape[0] and int(ids[reuse - 1]) == image_id and int(ids[reuse]) == image_id:
            while reuse > 0 and int(ids[reuse - 1]) == image_id:  # back off to before the whole run
                reuse -= 1
        return reuse

    def _continuation_inputs(self, inputs, reuse: int) -> dict:
        """generate() arguments that continue from a cache holding the first `reuse` tokens.

        generate() gets the full ids and image grid (it computes 3D M-RoPE positions over the whole sequence and
        slices the uncached part itself), but only the features of images whose placeholders are not cached: the
        model scatters image features into the placeholders of the uncached tokens and checks their counts match.
        """
        ids = inputs["input_ids"]
        grid = inputs.get("image_grid_thw")
        model_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        if grid is None:
            return model_inputs
        is_image = ids[0] == self.model.config.image_token_id
        run_starts = is_image.clone()
        run_starts[1:] &= ~is_image[:-1]
        cached_images = int(run_starts[:reuse].sum())  # runs starting in the cache lie wholly in it
        patches = grid.prod(dim=-1)
        offset = int(patches[:cached_images].sum())
        if cached_images < grid.shape[0]:
            encoded = self.model.get_image_features(
                inputs["pixel_values"][offset:], grid[cached_images:], return_dict=True
            )
            model_inputs["mm_encoder_outputs"] = {"image": encoded}
        return model_inputs

    def _call_seed(self) -> int | None:
        if self.seed is None or not self.do_sample:
            return None
        return int(np.random.SeedSequence([self.seed, self._episode, self._calls]).generate_state(1)[0])


@contextmanager
def _seeded(seed: int | None, device):
    """Seed torch's RNGs for one generate call and restore their state afterwards (no-op for seed None)."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def load_pretrained(
    model: str | Path, dtype: str | None = "auto", revision: str | None = None, attn_implementation: str | None = None
) -> tuple[Any, Any]:
    """(model, processor) of a checkpoint, with `AutoModelForImageTextToText` and `AutoProcessor`, on the CPU.

    model: a local directory (holding config.json, the weights and the processor files) or a Hub id such as
    "Qwen/Qwen2.5-VL-7B-Instruct" (read from the Hugging Face cache first, fetched only when missing there and the
    Hub is not switched off). dtype: "auto" (the checkpoint's), "bfloat16", "float16", "float32", or None
    (transformers' default). revision, attn_implementation: passed to `from_pretrained` when set.
    Raises ValueError for a source that is neither, ModelLoadError (saying what to do) when loading fails.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = resolve_model_source(model)
    ensure_torchvision()
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = dtype if dtype in ("auto", None) else getattr(torch, dtype)
    shared = {"revision": revision} if revision else {}
    model_only = {"attn_implementation": attn_implementation} if attn_implementation else {}

    def load(**options):
        processor = AutoProcessor.from_pretrained(source, **shared, **options)
        vlm = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, **shared, **model_only, **options)
        return vlm, processor

    is_local = os.path.isdir(source)
    try:
        # A Hub id is looked up in the local Hugging Face cache first: offline, the online lookup retries each
        # file for tens of seconds before it gives up.
        return load() if is_local else load(local_files_only=True)
    except OSError as exc:
        if is_local or _offline():
            raise _load_error(source, is_local, exc) from exc
        try:
            return load()
        except OSError as exc2:
            raise _load_error(source, is_local, exc2) from exc2


def _offline() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message says from where and what to do."""


def _load_error(source: str, is_local: bool, exc: Exception) -> ModelLoadError:
    where = f"the local folder {source!r}" if is_local else f"the Hub id {source!r} (no local folder has that name)"
    return ModelLoadError(
        f"could not load a vision-language model from {where}: {exc}\n"
        "Without network access, either pass a local folder that holds config.json, the weights and the processor "
        "files (tokenizer, preprocessor, chat template), or download the model on a connected machine "
        "(`hf download <id>`) into the Hugging Face cache and set HF_HUB_OFFLINE=1."
    )


def resolve_model_source(model: str | Path) -> str:
    """A local folder, or a string that can only mean a Hub id; anything else raises ValueError saying why."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {text!r} is a file; pass the checkpoint folder that holds config.json")
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {text!r} has no config.json; pass the folder of a saved checkpoint")
        return str(path)
    if isinstance(model, Path) or not _HUB_ID.match(text):
        raise ValueError(
            f"model {text!r} does not exist as a local folder and is not a Hub id (owner/name); pass the folder of a "
            "saved checkpoint (config.json, weights, processor files) or an id such as Qwen/Qwen2.5-VL-7B-Instruct"
        )
    return text

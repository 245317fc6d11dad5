"""The optional teacher-LLM path of the SFT data: any OpenAI-compatible chat endpoint given by URL writes
(a) extra user instructions for a target and modality (fact-based: the prompt names only the target and the
modality, paper Appendix B.2) and (b) step reasoning from privileged facts in the persona of Appendix B.3.

Only the standard library talks to the endpoint (`POST {base_url}/chat/completions`). Every reasoning reply
passes the leak filter (`leaks.py`); a leaking or malformed reply is asked for again, and after `attempts`
tries (or when the endpoint fails) the weight-free `describe_step` writes the step instead. `stats` counts it all.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ibisagent.types import Click

from .leaks import FORBIDDEN, find_leaks
from .prompts import FAMILY_DESCRIPTIONS, INITIAL_FAMILIES, InstructionLibrary, Prompt, fill_fields, find_unsupported
from .reasoning import StepContext, describe_step, oracle_facts


class TeacherError(RuntimeError):
    """The teacher endpoint could not give a usable answer."""


class TeacherConnectionError(TeacherError):
    """The endpoint could not be reached (refused, unknown host, timed out)."""


class TeacherHTTPError(TeacherError):
    """The endpoint answered with an HTTP error status (`status`)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class TeacherResponseError(TeacherError):
    """The endpoint answered 200 with a body that is not an OpenAI chat completion."""


_RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx


class TeacherClient:
    """A minimal client of an OpenAI-compatible chat-completions endpoint.

    base_url:    up to but excluding `/chat/completions`, e.g. "http://localhost:8000/v1" (vLLM, SGLang, Ollama,
                 LM Studio, a hosted API).
    model:       the model name the endpoint expects.
    api_key:     sent as a Bearer token; when None it is read from the environment variable `api_key_env`
                 (no header when that is unset too, as local servers need none).
    timeout:     seconds per request. retries: extra tries after a network error, timeout, HTTP 408/409/425/429
                 or 5xx, or a malformed body; the wait before retry k (1-based) is backoff * 2**(k-1) seconds.
    temperature, max_tokens: sampling parameters sent with every request (max_tokens None: not sent).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        temperature: float = 0.7,
        max_tokens: int | None = 512,
    ):
        if not re.match(r"^https?://[^/\s]+", base_url or ""):
            raise ValueError(f"teacher base_url {base_url!r} is not an http(s) URL; give e.g. http://localhost:8000/v1")
        if not model:
            raise ValueError("teacher model name is empty; give the model the endpoint serves")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"need retries >= 0, timeout > 0, backoff >= 0; got {retries}, {timeout}, {backoff}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.stats: Counter = Counter()

    def chat(self, messages: Sequence[dict], **params) -> str:
        """The text of the first choice for `messages` (OpenAI message dicts); extra `params` go into the
        request body. Raises TeacherConnectionError, TeacherHTTPError or TeacherResponseError after the retries."""
        body = {"model": self.model, "messages": list(messages), "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(params)
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: TeacherError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                return self._post(data, headers)
            except TeacherHTTPError as exc:
                if exc.status < 500 and exc.status not in _RETRY_STATUS:
                    raise
                last = exc
            except (TeacherConnectionError, TeacherResponseError) as exc:
                last = exc
        assert last is not None
        raise type(last)(*_with_attempts(last, self.retries + 1))

    def _post(self, data: bytes, headers: dict) -> str:
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            hint = ""
            if exc.code in (401, 403):
                hint = f"; check the API key (argument or ${self.api_key_env})"
            elif exc.code == 404:
                hint = "; check the base URL (it ends before /chat/completions, e.g. http://host:8000/v1) and the model"
            raise TeacherHTTPError(
                f"teacher endpoint {self.url} answered HTTP {exc.code}: {detail}{hint}", exc.code
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TeacherConnectionError(
                f"cannot reach the teacher endpoint {self.url}: {reason}; check the URL and that the server runs"
            ) from None
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TeacherResponseError(
                f"teacher endpoint {self.url} returned a body that is not JSON: {raw[:200]!r}"
            ) from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TeacherResponseError(
                f"teacher endpoint {self.url} returned JSON without choices[0].message.content: {str(payload)[:200]}"
            ) from None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise TeacherResponseError(f"teacher endpoint {self.url} returned non-text content: {str(content)[:200]}")
        return content


def _with_attempts(exc: TeacherError, attempts: int) -> tuple:
    message = f"{exc} (after {attempts} attempt{'s' if attempts != 1 else ''})"
    return (message, exc.status) if isinstance(exc, TeacherHTTPError) else (message,)


# -- (a) instructions ---------------------------------------------------------------------------------------------
INSTRUCTION_SYSTEM_PROMPT = (
    "You write requests that a clinician might type to a medical image segmentation assistant. The assistant can "
    "only segment the named structure by placing points; it cannot count, measure, classify, diagnose or describe. "
    "Base every request strictly on the facts given: the image is a {image} that contains {a_target}. Do not "
    "invent findings, other structures, patient details, sides or locations that are not given. Every request "
    "must name '{target}' exactly and ask for it to be segmented (or outlined, delineated, masked)."
)
INSTRUCTION_USER_PROMPT = (
    "Write {n} different requests of this kind: {style}.{examples} Reply with a JSON array of strings ({n} of "
    "them) and nothing else."
)


class TeacherInstructions:
    """Extra initialisation prompts for one target and modality from a teacher LLM (paper B.2, fact-based).

    Replies are parsed as a JSON array of strings; an item is kept only if it names the target, contains no
    leak word (`leaks.FORBIDDEN`) and asks nothing the agent cannot do (`prompts.UNSUPPORTED_REQUESTS`).
    `stats` counts calls, accepted items and each rejection reason.
    """

    def __init__(self, client: TeacherClient, library: InstructionLibrary | None = None, max_calls: int = 3):
        self.client = client
        self.library = library or InstructionLibrary()
        self.max_calls = max_calls
        self.stats: Counter = Counter()

    def generate(
        self,
        target: str,
        modality: str,
        n: int = 8,
        family: str | None = None,
        rng: random.Random | None = None,
        plural: bool | None = None,
    ) -> list[Prompt]:
        """Up to `n` distinct prompts (fewer when the teacher's replies do not pass the filters within
        `max_calls` calls). `family` from `INITIAL_FAMILIES` sets the style and gives two library examples;
        None asks for a mix (family "teacher"). Raises TeacherError when the endpoint fails."""
        if family is not None and family not in INITIAL_FAMILIES:
            raise ValueError(f"unknown initial family {family!r}; choose one of {', '.join(INITIAL_FAMILIES)}")
        rng = rng or random.Random(0)
        fields = fill_fields(target, modality, plural)
        style = FAMILY_DESCRIPTIONS[family] if family else "a mix of commands, goal statements and questions"
        examples = ""
        if family:
            picks = [self.library.initial(target, modality, rng, family, plural).text for _ in range(2)]
            examples = " Examples: " + " | ".join(dict.fromkeys(picks)) + "."
        system = INSTRUCTION_SYSTEM_PROMPT.format(**fields)
        accepted: list[str] = []
        seen: set[str] = set()
        for _ in range(self.max_calls):
            if len(accepted) >= n:
                break
            want = n - len(accepted)
            user = INSTRUCTION_USER_PROMPT.format(n=want, style=style, examples=examples)
            self.stats["calls"] += 1
            reply = self.client.chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
            items = _json_list(reply)
            if items is None:
                self.stats["malformed"] += 1
                continue
            for item in items:
                reason = _reject_instruction(item, fields["target"])
                key = " ".join(str(item).lower().split())
                if reason is None and key in seen:
                    reason = "duplicate"
                if reason:
                    self.stats[f"rejected_{reason}"] += 1
                    continue
                seen.add(key)
                accepted.append(" ".join(item.split()))
        self.stats["accepted"] += len(accepted[:n])
        return [Prompt(family or "teacher", text) for text in accepted[:n]]


def _json_list(reply: str) -> list | None:
    text = reply.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        items = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    return items if isinstance(items, list) else None


def _reject_instruction(item: object, target: str) -> str | None:
    if not isinstance(item, str) or not item.strip():
        return "not_text"
    if len(item) > 300:
        return "too_long"
    if target.lower() not in item.lower():
        return "missing_target"
    if find_leaks(item, allow=(target,)):
        return "leak"
    if find_unsupported(item):
        return "unsupported"
    return None


# -- (b) step reasoning -------------------------------------------------------------------------------------------
PERSONA_PROMPT = (
    "You are an expert radiologist teaching a junior segmentation agent. The agent segments one structure in a "
    "medical image by placing positive points (to add to the mask) and negative points (to remove from it). "
    "This agent ONLY SEES ONE THING: the image with a single, combined green mask (its current segmentation) "
    "overlaid, or no mask at the first step. It cannot see what you know: which parts of the mask are right or "
    "wrong, which parts of the structure are missing, or the correct next point. You are given those privileged "
    "facts, and sometimes a privileged image in which green marks correctly masked area, red marks mask outside "
    "the structure and blue marks missed structure, with the next point drawn on it. Write the agent's reasoning "
    "for its next move in the first person, 1 to 3 sentences, as if you are genuinely deducing the next step from "
    "only the visible image: explain which visual features (texture, intensity, anatomical landmarks, the mask's "
    "edge) show that the mask is incomplete, overreaching or finished, and end with the move. Never mention colours "
    "other than the green mask, the privileged image, the facts, numbers, coordinates or scores. Forbidden words: "
    + ", ".join(FORBIDDEN)
    + ". Reply with the reasoning text only."
)
_MOVES = {
    "initial": "place a positive point on the structure (this is the first step; no mask is shown)",
    "add": "place the positive point(s) listed below",
    "remove": "place the negative point(s) listed below",
    "terminate": "stop: the mask is good enough and no further point is needed",
    "undo": "undo the previous point, which made the mask worse",
    "discard": "discard the given mask, which covers the wrong structure, and segment the requested one instead",
    "absent": "stop without a mask: the requested structure is not in the image",
}


def reasoning_request(ctx: StepContext) -> str:
    """The user message of a reasoning request: the privileged facts of one step in words."""
    facts = oracle_facts(ctx)
    lines = [
        f"Target: {facts['target']}. Imaging modality: {facts['modality'] or 'unknown'}. Step {facts['step']}.",
        f"Correct move: {_MOVES[ctx.kind]}.",
    ]
    if ctx.kind not in ("absent",):
        lines.append(
            "The mask is empty."
            if facts["mask_empty"]
            else f"The mask covers {facts['target_fraction_covered']:.0%} of the structure; "
            f"{facts['mask_fraction_outside_target']:.0%} of the mask lies outside it."
        )
    for c in facts["clicks"]:
        side = f", on the {c['region_side']} side" if c["region_side"] else ""
        lines.append(
            f"{c['sign'].capitalize()} point in {c['where']}: inside the {c['region']} ({c['region_size']}, "
            f"relation to the mask: {c['region_relation']}{side})."
        )
    if "previous_target_fraction_covered" in facts:
        lines.append(f"Before the previous point the mask covered {facts['previous_target_fraction_covered']:.0%}.")
    lines.append("Write the agent's reasoning now.")
    return "\n".join(lines)


def privileged_view(image: np.ndarray, mask: np.ndarray, gt: np.ndarray, clicks: Sequence[Click] = ()) -> np.ndarray:
    """The oracle's picture of a step (paper Fig. 7, left): HxWx3 uint8 with correctly masked area green, mask
    outside the target red, missed target blue (alpha 0.5), and each next click as a ring (blue positive, red
    negative). image: HxWx3 uint8 (or HxW); mask, gt: HxW bool; clicks in (x, y) pixels."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    out = img[..., :3].astype(np.float32)
    mask, gt = np.asarray(mask, bool), np.asarray(gt, bool)
    for region, colour in ((mask & gt, (0, 200, 0)), (mask & ~gt, (230, 0, 0)), (gt & ~mask, (0, 80, 255))):
        out[region] = out[region] * 0.5 + np.asarray(colour, np.float32) * 0.5
    h, w = out.shape[:2]
    radius = max(4, min(h, w) // 60)
    yy, xx = np.ogrid[:h, :w]
    for c in clicks:
        row, col = c.pixel(h, w)
        d2 = (yy - row) ** 2 + (xx - col) ** 2
        out[(d2 <= radius**2) & (d2 >= (radius - 2) ** 2)] = (0, 80, 255) if c.positive else (230, 0, 0)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def png_data_url(image: np.ndarray, max_side: int = 1024) -> str:
    """An HxWx3 uint8 image as a `data:image/png;base64,...` URL, downscaled so its longer side is <= max_side."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    if max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def clean_reasoning(reply: str) -> str | None:
    """The reasoning text of a teacher reply, or None when it is malformed (empty, too long, more than 4
    sentences, or holding markup such as leftover tags). Surrounding <think> tags, quotes and fences are removed."""
    text = reply.strip()
    text = re.sub(r"^```\w*\s*|\s*```$", "", text)
    text = re.sub(r"^<think>\s*|\s*</think>$", "", text).strip().strip('"').strip()
    text = " ".join(text.split())
    if not text or len(text) > 800 or re.search(r"[<>{}\[\]]|```", text):
        return None
    if len(re.findall(r"[.!?](?:\s|$)", text)) > 4:
        return None
    return text


class TeacherReasoner:
    """Step reasoning from a teacher LLM with the leak filter, falling back to a default generator.

    Call it like `describe_step`: `reasoner(ctx, rng)` -> text; pass `image` (HxWx3 uint8, the original image)
    to show the teacher the privileged view as well. Each call makes up to `attempts` requests (each with the
    client's own network retries); a reply that leaks or is malformed is asked for again. When no reply passes,
    or the endpoint fails and `on_error` is "fallback", `fallback(ctx, rng)` writes the text; with
    on_error="raise" endpoint errors propagate. `stats`: calls, accepted, leaks, malformed, errors, fallbacks.
    """

    def __init__(
        self,
        client: TeacherClient,
        fallback: Callable[[StepContext, random.Random], str] = describe_step,
        attempts: int = 2,
        on_error: str = "fallback",
        system_prompt: str = PERSONA_PROMPT,
        max_image_side: int = 1024,
    ):
        if on_error not in ("fallback", "raise"):
            raise ValueError(f"on_error must be 'fallback' or 'raise', got {on_error!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.client = client
        self.fallback = fallback
        self.attempts = attempts
        self.on_error = on_error
        self.system_prompt = system_prompt
        self.max_image_side = max_image_side
        self.stats: Counter = Counter()

    def messages(self, ctx: StepContext, image: np.ndarray | None = None) -> list[dict]:
        """The chat messages of one reasoning request."""
        text = reasoning_request(ctx)
        if image is None:
            user: str | list = text
        else:
            view = privileged_view(image, ctx.mask, ctx.gt, ctx.clicks)
            url = png_data_url(view, self.max_image_side)
            user = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def __call__(self, ctx: StepContext, rng: random.Random, image: np.ndarray | None = None) -> str:
        self.stats["calls"] += 1
        messages = self.messages(ctx, image)
        for _ in range(self.attempts):
            try:
                reply = self.client.chat(messages)
            except TeacherError:
                if self.on_error == "raise":
                    raise
                self.stats["errors"] += 1
                break
            text = clean_reasoning(reply)
            if text is None:
                self.stats["malformed"] += 1
                continue
            if find_leaks(text, allow=(ctx.target,)):
                self.stats["leaks"] += 1
                continue
            self.stats["accepted"] += 1
            return text
        self.stats["fallbacks"] += 1
        return self.fallback(ctx, rng)

    def report(self) -> str:
        """One line for logs, e.g. "teacher reasoning: 98/100 accepted, 2 fallbacks (3 leaks, 0 malformed,
        1 errors)"."""
        s = self.stats
        return (
            f"teacher reasoning: {s['accepted']}/{s['calls']} accepted, {s['fallbacks']} fallbacks "
            f"({s['leaks']} leaks, {s['malformed']} malformed, {s['errors']} errors)"
        )

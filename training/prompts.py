"""The instruction and answer library of the SFT data (paper Appendix B.2): user prompts that start a segmentation,
user prompts of refinement turns, the assistant's final answers, and absent-target questions with refusals.

Templates are Python `str.format` strings filled per sample with the target name and the imaging modality. Fields
(each also in a capitalised form for the start of a sentence, e.g. ``{The_target}``, ``{Is_there}``):

    {target}      liver tumor           | neoplastic cells
    {a_target}    a liver tumor         | neoplastic cells       (indefinite: "a"/"an", none for plurals)
    {the_target}  the liver tumor       | the neoplastic cells
    {is} {was} {has}      is was has    | are were have
    {it} {its}            it its        | them their
    {there_is}    there is              | there are
    {is_there}    is there              | are there
    {modality}    CT / MRI / X-ray ...  (display name of the modality)
    {image}       CT scan / X-ray image / pathology slide ...
    {a_image}     a CT scan / an MRI scan / an X-ray image ...

Every choice is drawn from the `random.Random` passed in, so a seed reproduces a data set. The defaults are the
module-level tuples below; `InstructionLibrary.from_file` replaces any of them from a user yaml/json file.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .leaks import find_leaks

# -- families and styles ------------------------------------------------------------------------------------------
IMPERATIVE_FAMILIES = ("direct", "goal")
INTERROGATIVE_FAMILIES = ("conditional", "compound", "protocol", "conversational", "concise")
INITIAL_FAMILIES = IMPERATIVE_FAMILIES + INTERROGATIVE_FAMILIES
REFINEMENT_KINDS = ("next_step", "error_correction", "verification")
ERROR_HINTS = ("over", "under")  # what an error-correction prompt may say is wrong: mask too large / too small
ANSWER_STYLES = ("direct", "affirmation", "object", "qa", "conversational")

FAMILY_DESCRIPTIONS = {
    "direct": "a direct command to segment the target",
    "goal": "a goal-oriented statement of why the user needs the target segmented",
    "conditional": "conditional logic: ask whether the target is present and, if so, to segment it",
    "compound": "a compound request: find the target and segment it",
    "protocol": "a formal clinical-protocol tone asking to verify the target and segment it",
    "conversational": "an indirect, conversational question that asks for the target's segmentation",
    "concise": "a terse check of a few words asking for the target's segmentation",
}

# -- initialisation prompts ---------------------------------------------------------------------------------------
DIRECT_COMMANDS = (
    "Segment {the_target} in this {image}.",
    "Please segment {the_target}.",
    "Delineate {the_target} on this {image}.",
    "Outline {the_target} in the image.",
    "Create a segmentation mask of {the_target}.",
    "Mark {the_target} in this {image}.",
    "Segment {the_target}.",
    "Produce a mask of {the_target} in this {image}.",
)
GOAL_ORIENTED = (
    "I want to see the exact extent of {the_target} in this {image}.",
    "To assess {the_target}, I need {it} segmented.",
    "My goal is to isolate {the_target} from the surrounding structures in this {image}.",
    "I am reviewing {the_target} and need {its} outline marked precisely.",
    "For my report, I need a precise mask of {the_target} on this {image}.",
    "Help me isolate {the_target} in this {image}.",
    "I'd like {the_target} highlighted so I can examine {it} more closely.",
)
CONDITIONAL = (
    "{Is_there} {a_target} in this {image}? If so, please segment {it}.",
    "If {there_is} {a_target} in this image, segment {it}.",
    "Check this {image} for {a_target}, and segment {it} if present.",
    "Does this {image} show {a_target}? If yes, outline {it}.",
    "Should {a_target} be visible here, please delineate {it}.",
)
COMPOUND = (
    "Can you find and segment {the_target}?",
    "Could you locate {the_target} in this {image} and outline {it}?",
    "Can you identify {the_target} and produce a mask of {it}?",
    "Would you find {the_target} on this {image} and segment {it}?",
    "Can you detect and delineate {the_target} in the image?",
)
PROTOCOL = (
    "I need to verify the presence of {a_target} on this {image}; please segment {it} if found.",
    "For clinical documentation, confirm whether {there_is} {a_target} and provide {its} segmentation.",
    "As part of the standard review of this {image}, please check for {a_target} and segment {it}.",
    "Per protocol, {the_target} must be delineated on this {image}. Can you provide the segmentation?",
    "Please assess this {image} for {a_target} and, if identified, provide a segmentation mask.",
)
CONVERSATIONAL = (
    "I'm wondering if {there_is} {a_target} in this {image}. Could you segment {it} for me?",
    "I'm not sure where {the_target} {is} on this {image}. Could you show me by segmenting {it}?",
    "I think I can see {a_target} here. Could you segment {it} so I can take a closer look?",
    "Would you mind segmenting {the_target} in this image for me?",
    "I was hoping you could help me find {the_target} on this {image} and mark {it} out.",
)
CONCISE = (
    "Visible {target}? Please provide segmentation.",
    "{Target} present? Segment if so.",
    "Segment: {target}.",
    "Any {target}? Mask {it} if present.",
    "{Target} on this {image}? Segment {it}.",
)
INITIAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "direct": DIRECT_COMMANDS,
    "goal": GOAL_ORIENTED,
    "conditional": CONDITIONAL,
    "compound": COMPOUND,
    "protocol": PROTOCOL,
    "conversational": CONVERSATIONAL,
    "concise": CONCISE,
}

# -- refinement prompts -------------------------------------------------------------------------------------------
NEXT_STEP = (
    "What is the next step?",
    "What should be done next to improve the segmentation of {the_target}?",
    "Continue refining the mask.",
    "Proceed with the next refinement step.",
    "How would you refine the current mask?",
)
ERROR_CORRECTION = (  # generic: true whatever the mask's error is
    "Please correct any errors in the current mask of {the_target}.",
    "The mask may not be accurate yet; fix it where needed.",
    "Refine the mask so that it matches {the_target} more closely.",
    "Check the mask edges and correct any mistakes.",
)
ERROR_CORRECTION_OVER = (  # only when the mask does include too much
    "The mask extends beyond the boundary of {the_target}.",
    "The mask seems to include tissue outside {the_target}; please trim it.",
    "There is excess segmentation outside {the_target}; please correct it.",
    "The segmentation spills over the edge of {the_target}. Fix it.",
)
ERROR_CORRECTION_UNDER = (  # only when the mask does miss part of the target
    "The mask does not cover all of {the_target}.",
    "Part of {the_target} is still missing from the mask; please extend it.",
    "The segmentation looks incomplete; please add the missed parts of {the_target}.",
    "The mask is too small for {the_target}. Please grow it.",
)
VERIFICATION = (
    "Is this segmentation complete?",
    "Does the mask now cover {the_target} accurately?",
    "Is the mask of {the_target} finished, or does it need more work?",
    "Check whether the current segmentation is final.",
    "Is any further refinement needed?",
)
REFINEMENT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "next_step": NEXT_STEP,
    "error_correction": ERROR_CORRECTION,
    "error_correction_over": ERROR_CORRECTION_OVER,
    "error_correction_under": ERROR_CORRECTION_UNDER,
    "verification": VERIFICATION,
}

# -- assistant answers --------------------------------------------------------------------------------------------
ANSWER_DIRECT = (
    "Segmentation complete.",
    "Done: {the_target} {is} segmented.",
    "{The_target}: segmented.",
    "Mask of {the_target} completed.",
)
ANSWER_AFFIRMATION = (
    "{The_target} {has} been successfully segmented.",
    "The segmentation of {the_target} is complete and follows {its} boundary.",
    "I have successfully segmented {the_target}.",
    "{The_target} {has} been delineated accurately.",
)
ANSWER_OBJECT = (
    "{The_target} {is} fully segmented.",
    "The mask now covers {the_target} in this {image}.",
    "{The_target} on this {image} {is} now fully outlined.",
    "The segmentation of {the_target} on the {modality} image is complete.",
)
ANSWER_QA = (
    "Yes, {the_target} {was} found in this {image} and {has} been segmented.",
    "Yes, {there_is} {a_target} in the image, and I have segmented {it}.",
    "Yes, {the_target} {is} present; the mask now outlines {it}.",
    "Yes, I located {the_target} and outlined {it}.",
)
ANSWER_CONVERSATIONAL = (
    "All done!",
    "All done! {The_target} {is} segmented.",
    "Here you go: {the_target} {is} now segmented.",
    "That's it, {the_target} {is} fully covered by the mask.",
    "Finished! Let me know if you'd like any adjustments.",
)
ANSWER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "direct": ANSWER_DIRECT,
    "affirmation": ANSWER_AFFIRMATION,
    "object": ANSWER_OBJECT,
    "qa": ANSWER_QA,
    "conversational": ANSWER_CONVERSATIONAL,
}

# -- absent targets -----------------------------------------------------------------------------------------------
ABSENT_QUESTIONS = (
    "{Is_there} {a_target} in this {image}? If so, please segment {it}.",
    "Can you find and segment {the_target} in this {image}?",
    "Visible {target}? Please provide segmentation.",
    "I'm wondering if {there_is} {a_target} in this image. Could you segment {it}?",
    "Please check this {image} for {a_target} and segment {it} if present.",
    "I need to verify the presence of {a_target} on this {image}; please segment {it} if found.",
)
ABSENT_REFUSALS = (
    "No, I cannot see {a_target} in this {image}, so nothing was segmented.",
    "{The_target} {is} not visible in this image; no segmentation was produced.",
    "I could not find {a_target} in this {image}. Nothing has been segmented.",
    "{There_is} no {target} visible in this {image}, so I did not segment anything.",
    "After checking the image, I found no {target}; the segmentation is empty.",
)

# Requests the action grammar (clicks, Undo, Terminate + a short answer) cannot carry out.
UNSUPPORTED_REQUESTS = (
    "count",
    "how many",
    "measure",
    "measurement",
    "diameter",
    "volume",
    "size in",
    "bounding box",
    "classify",
    "diagnos",
    "grade",
    "stage",
    "describe",
    "all structures",
    "every structure",
)

# -- grammar helpers ----------------------------------------------------------------------------------------------
# Vocabulary per modality: display name, image noun, what its intensity is called, what lies next to a target.
_MODALITIES: dict[str, tuple[str, str, str, str]] = {
    "ct": ("CT", "CT scan", "attenuation", "neighbouring tissue"),
    "mri": ("MRI", "MRI scan", "signal intensity", "neighbouring tissue"),
    "mri-flair": ("FLAIR MRI", "FLAIR MRI scan", "FLAIR signal", "neighbouring brain tissue"),
    "mri-t1-gd": ("contrast-enhanced T1 MRI", "contrast-enhanced T1 MRI scan", "enhancement", "neighbouring tissue"),
    "x-ray": ("X-ray", "X-ray image", "density", "surrounding structures"),
    "xray": ("X-ray", "X-ray image", "density", "surrounding structures"),
    "ultrasound": ("ultrasound", "ultrasound image", "echo texture", "surrounding tissue"),
    "pathology": ("pathology", "pathology slide", "staining pattern", "surrounding tissue"),
    "histopathology": ("histopathology", "histopathology slide", "staining pattern", "surrounding tissue"),
    "endoscope": ("endoscopy", "endoscopy image", "surface appearance", "surrounding mucosa"),
    "endoscopy": ("endoscopy", "endoscopy image", "surface appearance", "surrounding mucosa"),
    "dermoscopy": ("dermoscopy", "dermoscopy image", "pigmentation", "surrounding skin"),
    "fundus": ("fundus", "fundus photograph", "brightness", "surrounding retina"),
    "oct": ("OCT", "OCT scan", "reflectivity", "adjacent retinal layers"),
    "pet": ("PET", "PET scan", "uptake", "neighbouring tissue"),
}


@dataclass(frozen=True)
class ModalityWords:
    """How text names a modality: display name ("MRI"), image noun ("MRI scan"), the intensity word
    ("signal intensity") and what surrounds a target ("neighbouring tissue")."""

    display: str
    image: str
    texture: str
    neighbour: str


def modality_words(modality: str) -> ModalityWords:
    """Vocabulary for a BiomedParse modality name (case-insensitive: "CT", "MRI-FLAIR", "X-Ray", "pathology", ...).

    Unknown names are used as they are ("{modality} image"); an empty name gives plain "image".
    """
    key = modality.strip().lower()
    if key in _MODALITIES:
        return ModalityWords(*_MODALITIES[key])
    if key.startswith("mri-"):  # MRI-T2, MRI-ADC, ...: the sequence name first
        seq = modality.strip()[4:]
        return ModalityWords(f"{seq} MRI", f"{seq} MRI scan", "signal intensity", "neighbouring tissue")
    if not key:
        return ModalityWords("", "image", "appearance", "surrounding area")
    name = modality.strip()
    return ModalityWords(name, f"{name} image", "appearance", "surrounding area")


_AN_LETTERS = set("AEFHILMNORSX")  # letters whose spoken name starts with a vowel sound ("an MRI", "an X-ray")
_SPOKEN_ACRONYMS = {"PET", "FLAIR", "COVID", "SPECT", "NASH", "LASER"}  # said as words: "a PET scan"
_A_PREFIXES = ("uni", "use", "usu", "ute", "uri", "uro", "eu", "one", "once")  # vowel letter, consonant sound
_AN_PREFIXES = ("hour", "honest", "honor", "honour", "heir")  # consonant letter, vowel sound


def article(phrase: str) -> str:
    """ "a" or "an" for a noun phrase, by sound: "an MRI scan", "a CT scan", "an X-ray", "a uterus", "an optic disc"."""
    word = phrase.strip().split(" ")[0] if phrase.strip() else ""
    if not word:
        return "a"
    head = re.split(r"[-/]", word)[0] or word
    if head.isupper() and len(head) <= 5 and head.isalpha() and head not in _SPOKEN_ACRONYMS:  # spelled out
        return "an" if head[0] in _AN_LETTERS else "a"
    if head[:1].isdigit():
        return "an" if head[0] == "8" or head.startswith(("11", "18")) else "a"
    low = word.lower()
    if low.startswith(_AN_PREFIXES):
        return "an"
    if low.startswith(_A_PREFIXES):
        return "a"
    return "an" if low[0] in "aeiou" else "a"


_PLURAL_WORDS = {"nuclei", "bacteria", "fungi", "data", "cells", "vessels", "metastases", "lungs", "kidneys"}
_SINGULAR_ENDINGS = ("ss", "us", "is", "as", "os", "ys")


def is_plural(target: str) -> bool:
    """Whether a target name reads as plural ("neoplastic cells", "polyps", "nuclei"); "pancreas", "uterus",
    "pubic symphysis" are singular. A heuristic: pass `plural=` to the library where it guesses wrong."""
    last = target.strip().split(" ")[-1].lower() if target.strip() else ""
    if last in _PLURAL_WORDS:
        return True
    return len(last) > 3 and last.endswith("s") and not last.endswith(_SINGULAR_ENDINGS)


def fill_fields(target: str, modality: str, plural: bool | None = None) -> dict[str, str]:
    """The values of every template field (see the module docstring) for one target and modality."""
    target = " ".join(target.split())
    if not target:
        raise ValueError("the target name is empty; give the structure to segment, e.g. 'liver tumor'")
    plural = is_plural(target) if plural is None else plural
    words = modality_words(modality)
    fields = {
        "target": target,
        "a_target": target if plural else f"{article(target)} {target}",
        "the_target": f"the {target}",
        "is": "are" if plural else "is",
        "was": "were" if plural else "was",
        "has": "have" if plural else "has",
        "it": "them" if plural else "it",
        "its": "their" if plural else "its",
        "there_is": "there are" if plural else "there is",
        "is_there": "are there" if plural else "is there",
        "modality": words.display or "medical",
        "image": words.image,
        "a_image": f"{article(words.image)} {words.image}",
    }
    fields.update({k[0].upper() + k[1:]: _capitalise(v) for k, v in list(fields.items())})
    return fields


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


FIELDS = tuple(fill_fields("target", "CT"))


def fill(template: str, target: str, modality: str, plural: bool | None = None) -> str:
    """Fill one template; the first letter of the result is upper-case."""
    try:
        return _capitalise(template.format(**fill_fields(target, modality, plural)))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"template {template!r} cannot be filled ({exc!r}); allowed fields: {', '.join(FIELDS)}"
        ) from exc


def find_unsupported(text: str) -> list[str]:
    """Phrases of `UNSUPPORTED_REQUESTS` in `text` (case-insensitive, word starts): requests the agent's actions
    cannot satisfy, such as counting or measuring."""
    low = text.lower()
    return [p for p in UNSUPPORTED_REQUESTS if re.search(rf"(?<![a-z]){re.escape(p)}", low)]


# -- the library --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One filled user prompt and the family (or refinement kind) its template came from."""

    family: str
    text: str


_SECTIONS = {
    "initial": INITIAL_FAMILIES,
    "refinement": tuple(REFINEMENT_TEMPLATES),
    "answers": ANSWER_STYLES,
}


class InstructionLibrary:
    """Templates for user prompts and assistant answers; every method is deterministic given its `rng`.

    initial:     {family: templates} for `INITIAL_FAMILIES`
    refinement:  {kind: templates} for next_step, error_correction, error_correction_over,
                 error_correction_under, verification
    answers:     {style: templates} for `ANSWER_STYLES`
    absent_questions, absent_refusals: templates for targets that are not in the image.
    Omitted arguments take the module's defaults. Templates are checked on construction (fields, leak words,
    unsupported requests); a bad one raises ValueError naming it.
    """

    def __init__(
        self,
        initial: Mapping[str, Sequence[str]] | None = None,
        refinement: Mapping[str, Sequence[str]] | None = None,
        answers: Mapping[str, Sequence[str]] | None = None,
        absent_questions: Sequence[str] | None = None,
        absent_refusals: Sequence[str] | None = None,
    ):
        self.initial_templates = _section("initial", initial, INITIAL_TEMPLATES)
        self.refinement_templates = _section("refinement", refinement, REFINEMENT_TEMPLATES)
        self.answer_templates = _section("answers", answers, ANSWER_TEMPLATES)
        self.absent_questions = tuple(ABSENT_QUESTIONS if absent_questions is None else absent_questions)
        self.absent_refusals = tuple(ABSENT_REFUSALS if absent_refusals is None else absent_refusals)
        self._validate()

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> InstructionLibrary:
        """Load templates from a .json or .yaml/.yml file shaped like `to_dict()`; the sections it gives
        (initial, refinement, answers, absent_questions, absent_refusals) replace the defaults, and within
        initial/refinement/answers only the families it names are replaced."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such template file")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ImportError(
                    f"{path}: reading yaml needs pyyaml (pip install pyyaml), or use a .json file"
                ) from exc
            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"{path}: unknown template file type {path.suffix!r}; use .json, .yaml or .yml")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
        known = {"initial", "refinement", "answers", "absent_questions", "absent_refusals"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {unknown}; known sections: {sorted(known)}")
        defaults = cls().to_dict()
        merged = {}
        for key in known:
            if key not in data:
                continue
            if isinstance(defaults[key], dict):
                if not isinstance(data[key], dict):
                    raise ValueError(f"{path}: section {key!r} must map names to lists of templates")
                merged[key] = {**defaults[key], **data[key]}
            else:
                merged[key] = data[key]
        return cls(**merged)

    def to_dict(self) -> dict:
        """All templates as plain lists, the shape `from_file` reads (a starting point for a custom file)."""
        return {
            "initial": {k: list(v) for k, v in self.initial_templates.items()},
            "refinement": {k: list(v) for k, v in self.refinement_templates.items()},
            "answers": {k: list(v) for k, v in self.answer_templates.items()},
            "absent_questions": list(self.absent_questions),
            "absent_refusals": list(self.absent_refusals),
        }

    def _validate(self) -> None:
        groups = [(f"initial/{k}", v, True) for k, v in self.initial_templates.items()]
        groups += [(f"refinement/{k}", v, False) for k, v in self.refinement_templates.items()]
        groups += [(f"answers/{k}", v, False) for k, v in self.answer_templates.items()]
        groups += [("absent_questions", self.absent_questions, True), ("absent_refusals", self.absent_refusals, True)]
        for name, templates, needs_target in groups:
            if not templates:
                raise ValueError(f"template group {name} is empty; give at least one template")
            for t in templates:
                if not isinstance(t, str) or not t.strip():
                    raise ValueError(f"template group {name} holds an empty or non-text template: {t!r}")
                used = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
                bad = sorted(used - set(FIELDS))
                if bad:
                    raise ValueError(
                        f"template {t!r} ({name}) uses unknown field(s) {bad}; allowed: {', '.join(FIELDS)}"
                    )
                if needs_target and not used & {"target", "a_target", "the_target", "Target", "A_target", "The_target"}:
                    raise ValueError(f"template {t!r} ({name}) must name the target with a {{target}} field")
                leaks, unsupported = find_leaks(t), find_unsupported(t)
                if leaks:
                    raise ValueError(f"template {t!r} ({name}) contains forbidden word(s) {leaks}")
                if unsupported and not name.startswith("answers"):
                    raise ValueError(f"template {t!r} ({name}) asks for {unsupported}, which the agent cannot do")
                fill(t, "target", "CT")

    # -- sampling -------------------------------------------------------------------------------------------
    def initial(
        self, target: str, modality: str, rng: random.Random, family: str | None = None, plural: bool | None = None
    ) -> Prompt:
        """A user prompt that starts a segmentation of `target`; `family` from `INITIAL_FAMILIES` (None: any,
        families equally likely)."""
        family = _pick_key(self.initial_templates, family, rng, "initial family")
        return Prompt(family, fill(rng.choice(self.initial_templates[family]), target, modality, plural))

    def refinement(
        self,
        rng: random.Random,
        kind: str | None = None,
        target: str = "target",
        modality: str = "",
        error: str | None = None,
        plural: bool | None = None,
    ) -> Prompt:
        """A user prompt for a refinement turn; `kind` from `REFINEMENT_KINDS` (None: any). For error_correction,
        `error` ("over": the mask includes too much, "under": it misses part) selects prompts that name that
        error; without it only prompts that are true for any error are used. Pass the target so prompts that
        name it read naturally."""
        if error is not None and error not in ERROR_HINTS:
            raise ValueError(f"unknown error hint {error!r}; choose one of {', '.join(ERROR_HINTS)} or None")
        if kind is None:
            kind = rng.choice(REFINEMENT_KINDS)
        if kind not in REFINEMENT_KINDS:
            raise ValueError(f"unknown refinement kind {kind!r}; choose one of {', '.join(REFINEMENT_KINDS)}")
        key = f"error_correction_{error}" if kind == "error_correction" and error else kind
        return Prompt(kind, fill(rng.choice(self.refinement_templates[key]), target, modality, plural))

    def answer(
        self, target: str, modality: str, rng: random.Random, style: str | None = None, plural: bool | None = None
    ) -> str:
        """The assistant's final answer after a successful segmentation; `style` from `ANSWER_STYLES`."""
        style = _pick_key(self.answer_templates, style, rng, "answer style")
        return fill(rng.choice(self.answer_templates[style]), target, modality, plural)

    def absent(self, target: str, modality: str, rng: random.Random, plural: bool | None = None) -> tuple[str, str]:
        """(question, refusal answer) for a target that is not in the image: the answer says it is not visible
        and that nothing was segmented."""
        question = fill(rng.choice(self.absent_questions), target, modality, plural)
        return question, fill(rng.choice(self.absent_refusals), target, modality, plural)


def _section(
    name: str, given: Mapping[str, Sequence[str]] | None, default: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    if given is None:
        return {k: tuple(v) for k, v in default.items()}
    unknown = sorted(set(given) - set(_SECTIONS[name]))
    if unknown:
        raise ValueError(f"{name}: unknown name(s) {unknown}; expected some of {', '.join(_SECTIONS[name])}")
    missing = sorted(set(_SECTIONS[name]) - set(given))
    if missing:
        raise ValueError(f"{name}: missing template group(s) {missing}; give all of {', '.join(_SECTIONS[name])}")
    return {k: tuple(given[k]) for k in _SECTIONS[name]}


def _pick_key(groups: Mapping[str, Sequence[str]], key: str | None, rng: random.Random, what: str) -> str:
    if key is None:
        return rng.choice(list(groups))
    if key not in groups:
        raise ValueError(f"unknown {what} {key!r}; choose one of {', '.join(groups)}")
    return key

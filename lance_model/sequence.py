"""Sequence builder: a task sample -> chat-template splits with MaPE positions (MODEL.md §3, §5).

The layout reproduces what the released checkpoints were trained on:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{visual conditions}{caption}<|im_end|>\\n
    <|im_start|>assistant\\n{target}<|im_end|>

A visual block is `<|vision_start|>` + K visual tokens + `<|vision_end|>` and forms one split
(ViT block and clean VAE condition: mode `full`; noisy VAE target: mode `noise`). The caption is a
split of its own so CFG dropout and the CFG-unconditional branch remove it as a unit. Each split
carries a modality code (the official one): -1 template text, 0 caption, 1 noisy target,
2 edit-source VAE, 3 reference-image VAE, 4 ViT; MaPE offsets are keyed on it.

The system prompts are compatibility constants of the released checkpoints (official
`data/common.py`), reproduced verbatim, including the typographic apostrophe in "user’s".
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .attention import CAUSAL, FULL, NOISE
from .tokenizer import IM_END, IM_START, VISION_END, VISION_START, Tokenizer

GENERATION_TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit", "subject")
UNDERSTANDING_TASKS = ("i2t", "v2t")
TASKS = GENERATION_TASKS + UNDERSTANDING_TASKS

# Modality codes (per split).
TEMPLATE, CAPTION, TARGET, SOURCE_VAE, REFERENCE_VAE, VIT = -1, 0, 1, 2, 3, 4
TOKENS_PER_SECOND = 2  # Qwen2.5-VL rule with one second per temporal grid step
VIT_T_OFFSET, REFERENCE_T_OFFSET = 1000, 2000

_APOS = "\u2019"
CAPTION_PROMPTS = (
    "Generate a detailed and accurate description of the {v}, including all the key moments and visual details.",
    "Write an in-depth depiction of the {v}, covering all its aspects.",
    "Write an exhaustive depiction of the given {v}, capturing its essence and key moments.",
    "Describe the key features of the input {v}, including color, shape, size, texture, objects, background.",
)
T2I_PROMPT = ("Describe the {v} by detailing the color, quantity, text, shape, size, texture, spatial relationships "
              "of the objects and background:")
T2V_PROMPT = ("Describe the {v} by detailing the color, quantity, visible text, shape, size, texture, spatial "
              "relationships and motion/camera movements of the objects and background:")
EDIT_PROMPT = ("Describe the key features of the input {v} (color, shape, size, texture, objects, background), then "
               f"explain how the user{_APOS}s text instruction should alter or modify the {{v}}. Generate a new {{v}} "
               f"that meets the user{_APOS}s requirements while maintaining consistency with the original input where "
               "appropriate.")
REFERENCE_PROMPT = ("Describe the key features of the input image (color, shape, size, texture, objects, background, "
                    f"style), then incorporate the user{_APOS}s text description to generate a new {{v}} that satisfies "
                    f"the user{_APOS}s requirements while preserving the essential identity and object or style "
                    "information from the reference input.")


def system_prompt(task: str, rng: random.Random | None = None) -> str:
    """The released checkpoints' system prompt for a task (x2t: one of four caption prompts;
    the first at inference, a random one in training when `rng` is given)."""
    video = task in ("t2v", "i2v", "video_edit", "v2t")
    v = "video" if video else "image"
    if task == "t2i":
        return T2I_PROMPT.format(v=v)
    if task in ("t2v",):
        return T2V_PROMPT.format(v=v)
    if task in ("image_edit", "video_edit"):
        return EDIT_PROMPT.format(v=v)
    if task in ("i2v", "subject"):
        return REFERENCE_PROMPT.format(v=v)
    if task in UNDERSTANDING_TASKS:
        return (rng.choice(CAPTION_PROMPTS) if rng is not None else CAPTION_PROMPTS[0]).format(v=v)
    raise ValueError(f"task={task!r}: expected one of {TASKS}")


@dataclass
class Visual:
    """One image/video as the model sees it.

    latent: VAE latent [C, T, H, W] (normalised); `latent_shape` (T, H, W) alone is enough when the
    latent is produced later (a generation target at inference).
    vit_tokens: merged ViT tokens [N, D] with `vit_grid` = the ViT patch grid (T/2, H/14, W/14);
    or `vit_patches` [N_patches, 3*2*14*14] to run the tower inside the forward.
    clean_frames: leading latent frames of a target that are clean conditions (i2v first frame)."""

    latent: torch.Tensor | None = None
    latent_shape: tuple[int, int, int] | None = None
    vit_tokens: torch.Tensor | None = None
    vit_patches: torch.Tensor | None = None
    vit_grid: tuple[int, int, int] | None = None
    clean_frames: int = 0

    def __post_init__(self) -> None:
        if self.latent is not None:
            if self.latent.dim() != 4:
                raise ValueError(f"Visual.latent must be [C, T, H, W], got shape {tuple(self.latent.shape)}")
            shape = tuple(int(s) for s in self.latent.shape[1:])
            if self.latent_shape is not None and tuple(self.latent_shape) != shape:
                raise ValueError(f"Visual.latent_shape {self.latent_shape} disagrees with latent shape {shape}")
            self.latent_shape = shape
        if self.vit_grid is not None:
            self.vit_grid = tuple(int(g) for g in self.vit_grid)


@dataclass
class Sample:
    """One training/inference sample. `source`: edit source, i2v first frame, x2t input, subject reference.

    `caption_ids` / `answer_ids` / `system_ids`: the caption's, the answer's and the system prompt's
    token ids when they were tokenized ahead (curated shards store them); the builder then uses them
    instead of encoding the text, which stays for display. They must come from the builder's
    tokenizer. `system`: the system prompt (None: the task's default, `system_prompt`); an x2t
    sample's instruction goes here."""

    task: str
    caption: str = ""
    answer: str | None = None
    target: Visual | None = None
    source: Visual | None = None
    system: str | None = None
    caption_ids: list[int] | None = None
    answer_ids: list[int] | None = None
    system_ids: list[int] | None = None

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {TASKS}")
        if self.task in GENERATION_TASKS:
            if self.target is None or self.target.latent_shape is None:
                raise ValueError(f"{self.task} sample needs a target with a latent or latent_shape")
            if self.task in ("image_edit", "video_edit", "subject") and self.source is None:
                raise ValueError(f"{self.task} sample needs a source visual")
        if self.task in UNDERSTANDING_TASKS and (self.source is None or self.source.vit_grid is None):
            raise ValueError(f"{self.task} sample needs a source with ViT tokens/patches and vit_grid")


@dataclass
class Split:
    mode: str  # causal / full / noise (mask mode)
    kind: str  # text / vit / vae
    modality: int
    text_ids: list[int] = field(default_factory=list)  # text split: all tokens; visual: [start, end]
    visual: Visual | None = None
    grid: tuple[int, int, int] | None = None  # LLM grid of a visual block
    ce: bool = False  # answer split: next-token loss on its tokens

    def __len__(self) -> int:
        if self.kind == "text":
            return len(self.text_ids)
        t, h, w = self.grid
        return t * h * w + 2


@dataclass
class RenderedSample:
    task: str
    splits: list[Split]
    positions: torch.Tensor  # long [3, n_tokens] (MaPE t, h, w)

    def __len__(self) -> int:
        return int(self.positions.shape[1])


class SequenceBuilder:
    """Renders samples with a tokenizer; `vit_merge` is the ViT spatial merge (2)."""

    def __init__(self, tokenizer: Tokenizer, vit_merge: int = 2) -> None:
        self.tok = tokenizer
        self.vit_merge = vit_merge
        self.vs, self.ve = tokenizer.special_id(VISION_START), tokenizer.special_id(VISION_END)

    # ------------------------------------------------------------------ pieces
    def _text(self, text: str, modality: int = TEMPLATE, ce: bool = False, ids: list[int] | None = None) -> Split:
        return Split(CAUSAL, "text", modality, list(ids) if ids is not None else self.tok.encode(text), ce=ce)

    def _vit(self, visual: Visual) -> Split:
        gt, gh, gw = visual.vit_grid
        m = self.vit_merge
        if gh % m or gw % m:
            raise ValueError(f"vit_grid {visual.vit_grid}: height/width must be divisible by the merge size {m}")
        return Split(FULL, "vit", VIT, [self.vs, self.ve], visual, (gt, gh // m, gw // m))

    def _vae(self, visual: Visual, mode: str, modality: int) -> Split:
        return Split(mode, "vae", modality, [self.vs, self.ve], visual, tuple(visual.latent_shape))

    # ------------------------------------------------------------------ samples
    def render(self, sample: Sample, drop_caption: bool = False, drop_condition: bool = False,
               rng: random.Random | None = None) -> RenderedSample:
        """Splits + positions. `drop_caption`/`drop_condition` implement CFG dropout and the
        unconditional CFG branches (caption removed / visual condition removed)."""
        sample.validate()
        task = sample.task
        if sample.system_ids is not None:
            head, tail = self.tok.encode(f"{IM_START}system\n"), self.tok.encode(f"{IM_END}\n{IM_START}user\n")
            splits = [self._text("", ids=[*head, *sample.system_ids, *tail])]
        else:
            system = sample.system if sample.system is not None else system_prompt(task, rng)
            splits = [self._text(f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n")]
        src = sample.source
        if not drop_condition and src is not None:
            if task in ("image_edit", "video_edit", "subject", "i2t", "v2t") and src.vit_grid is not None:
                splits.append(self._vit(src))
            if task in ("image_edit", "video_edit", "subject") and src.latent_shape is not None:
                splits.append(self._vae(src, FULL, REFERENCE_VAE if task == "subject" else SOURCE_VAE))
        if (sample.caption or sample.caption_ids) and not drop_caption:
            splits.append(self._text(sample.caption, CAPTION, ids=sample.caption_ids))
        splits.append(self._text(f"{IM_END}\n{IM_START}assistant\n"))
        if task in GENERATION_TASKS:
            splits.append(self._vae(sample.target, NOISE, TARGET))
            splits.append(self._text(IM_END))
        elif sample.answer_ids is not None:
            splits.append(self._text("", ce=True, ids=[*sample.answer_ids, self.tok.special_id(IM_END)]))
        elif sample.answer is not None:
            splits.append(self._text(sample.answer + IM_END, ce=True))
        splits = [s for s in splits if len(s) > 0]
        return RenderedSample(task, splits, mape_positions(splits))


def mape_positions(splits: list[Split]) -> torch.Tensor:
    """MaPE (t, h, w) positions of a rendered sample: Qwen2.5-VL M-RoPE indices, then the modality
    offsets (ViT group temporal start at 1000, reference VAE at 2000, edit target = source)."""
    chunks: list[torch.Tensor] = []
    p = 0
    for split in splits:
        if split.kind == "text":
            n = len(split.text_ids)
            chunks.append(torch.arange(p, p + n).expand(3, n))
            p += n
            continue
        gt, gh, gw = split.grid
        t, h, w = torch.meshgrid(torch.arange(gt) * TOKENS_PER_SECOND, torch.arange(gh), torch.arange(gw), indexing="ij")
        block = torch.stack([t.flatten(), h.flatten(), w.flatten()]) + (p + 1)
        top = int(block.max())
        chunks.append(torch.cat([torch.full((3, 1), p), block, torch.full((3, 1), top + 1)], dim=1))
        p = top + 2
    pos = torch.cat(chunks, dim=1).long().clone()

    starts, offset = [], 0
    for split in splits:
        starts.append(offset)
        offset += len(split)
    spans = {m: [(a, a + len(s)) for a, s in zip(starts, splits) if s.modality == m]
             for m in (VIT, REFERENCE_VAE, SOURCE_VAE, TARGET)}
    for modality, first_t in ((VIT, VIT_T_OFFSET), (REFERENCE_VAE, REFERENCE_T_OFFSET)):
        if spans[modality]:
            shift = first_t - int(pos[0, spans[modality][0][0]])
            for a, b in spans[modality]:
                pos[0, a:b] += shift
    if spans[SOURCE_VAE] and spans[TARGET]:
        (sa, sb), (ta, tb) = spans[SOURCE_VAE][0], spans[TARGET][0]
        if sb - sa == tb - ta:
            pos[:, ta:tb] = pos[:, sa:sb]
    return pos

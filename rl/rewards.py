"""Rewards for GRPO: the OCR text-rendering reward of RL.md §3 and multi-reward weighting.

The reward is checked up front and cheap to reason about:
- target = the first double-quoted span of the prompt; a prompt without one (or with an empty one)
  is a `PromptError` naming the prompt, raised before any sampling (`check_prompts`);
- both strings are lower-cased with all whitespace removed; distance = 0 when the target is a
  substring of the recognised text, else the Levenshtein distance capped at len(target);
  reward = 1 - distance / len(target) in [0, 1]; no recognised text gives 0;
- a video is scored on every k-th frame, averaging the frames that score above 0;
- an OCR failure on one image gives that image 0 and is counted; the rest of the batch goes on.

Several components can be computed from one OCR pass (`REWARD_COMPONENTS`, name -> function of
(recognised, target)); `combine_rewards` applies the configured name -> weight mapping and the
weighted sum drives the advantages while every component is logged.

`ocr_ctc` (LIKELIHOOD_COMPONENT) is a dense component for engines with a recogniser likelihood
(RapidOCR, `rl.ocr.RecognizerLikelihood`): the per-character CTC probability the recogniser gives
the target on the whole image read as one text line, in [0, 1]. The text components are 0 for
every image a model cannot yet render legibly, so a group of such images has no spread and GRPO
skips it; `ocr_ctc` still ranks them by how much the recogniser sees the target in them (a clean
small rendering of the target scores ~1, another word ~1e-7, noise ~1e-3). It assumes the text
fills the image (small images such as the demo's 32 x 32); on a large scene with small text the
detect-then-read `ocr` component is the measure. An engine without a likelihood (PaddleOCR) does
not compute it, and weighting it then fails with the missing component named. `OcrReward` is the callable
class a Ray actor holds (`rl.actors`); it is also usable without Ray.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .ocr import OcrEngine, OcrError

log = logging.getLogger(__name__)

_QUOTED = re.compile(r'"([^"]*)"')
# Typographic double quotes (word processors write these): not the straight " a target needs.
_CURLY_QUOTES = re.compile("[\u201c\u201d\u201e\u201f\u00ab\u00bb\uff02\u301d\u301e]")
_CURLY_HINT = ('; curly/typographic quotes (\u201c\u2026\u201d) found in {}: the target text must be in '
               'straight double quotes ("...")')
_SPACE = re.compile(r"\s+")


class PromptError(ValueError):
    """A prompt cannot be scored (no double-quoted target text); the message names the prompt."""


# ------------------------------------------------------------------------------------ text
def target_text(prompt: str) -> str:
    """The first double-quoted span of `prompt` (raises `PromptError` if there is none, or it is empty)."""
    match = _QUOTED.search(prompt)
    if match is None or not normalize_text(match.group(1)):
        hint = _CURLY_HINT.format("it") if _CURLY_QUOTES.search(prompt) else ""
        raise PromptError(f'prompt {prompt!r} has no non-empty double-quoted target text '
                          f'(e.g. a sign that says "OPEN"){hint}')
    return match.group(1)


def check_prompts(prompts: Sequence[str], labels: Sequence[str] | None = None, source: str = "") -> None:
    """Reject, before any work, every prompt the OCR reward cannot score (all named at once, by
    `labels` when given, e.g. file line numbers, else by index; `source` prefixes the message)."""
    labels = labels if labels is not None else [f"#{i}" for i in range(len(prompts))]
    bad, curly = [], []
    for label, p in zip(labels, prompts):
        try:
            target_text(p)
        except PromptError:
            bad.append(f"{label}: {p!r}")
            if _CURLY_QUOTES.search(p):
                curly.append(str(label))
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... (+{len(bad) - 10})" if len(bad) > 10 else "")
        hint = _CURLY_HINT.format(", ".join(curly[:10]) + (" ..." if len(curly) > 10 else "")) if curly else ""
        raise PromptError(f"{source}{len(bad)} prompt(s) without a double-quoted target text: {shown}{hint}")


def normalize_text(text: str) -> str:
    return _SPACE.sub("", text.lower())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, each 1): the two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_similarity(recognized: str, target: str) -> float:
    """RL.md §3: 1 - min(distance, len) / len with distance 0 for a substring; 0 for no text."""
    rec, tgt = normalize_text(recognized), normalize_text(target)
    if not tgt:
        raise PromptError(f"empty target text {target!r}")
    if not rec:
        return 0.0
    distance = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - distance / len(tgt)


def ocr_exact(recognized: str, target: str) -> float:
    """1 when the normalised target appears in the recognised text, else 0 (a sparse, strict signal)."""
    return float(ocr_similarity(recognized, target) == 1.0)


def ocr_legible(recognized: str, target: str) -> float:
    """1 when the recognised text is as many Latin letters as the target has, right or wrong: the
    image shows letters, whichever. A diagnostic beside `ocr_exact` (not a reward term): a model that
    draws letters but not the asked-for ones scores here and not there."""
    rec, tgt = normalize_text(recognized), normalize_text(target)
    return float(len(rec) == len(tgt) > 0 and rec.isascii() and rec.isalpha())


REWARD_COMPONENTS: dict[str, Callable[[str, str], float]] = {"ocr": ocr_similarity, "ocr_exact": ocr_exact}
LIKELIHOOD_COMPONENT = "ocr_ctc"  # from the image itself, not the recognised text (engine.likelihood)
COMPONENT_NAMES = (*REWARD_COMPONENTS, LIKELIHOOD_COMPONENT)


def check_weights(weights: dict[str, float], prefix: str = "reward.weights") -> None:
    from lance_platform.config import ConfigError

    if not weights:
        raise ConfigError(f"{prefix}={weights!r}: expected at least one of {sorted(COMPONENT_NAMES)}")
    for name, w in weights.items():
        if name not in COMPONENT_NAMES:
            raise ConfigError(f"{prefix}.{name}: unknown reward; known: {sorted(COMPONENT_NAMES)}")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not np.isfinite(w):
            raise ConfigError(f"{prefix}.{name}={w!r}: expected a finite number")


def combine_rewards(components: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of the named components (each [N]) -> [N] float64."""
    missing = sorted(set(weights) - set(components))
    if missing:
        raise KeyError(f"reward components {missing} were not computed; have {sorted(components)}")
    total = np.zeros(len(next(iter(components.values()))), dtype=np.float64)
    for name, w in weights.items():
        total += w * np.asarray(components[name], dtype=np.float64)
    return total


def video_frame_score(frame_scores: Sequence[float]) -> float:
    """Mean over the frames with a positive score; 0 when none has one."""
    positive = [s for s in frame_scores if s > 0]
    return float(np.mean(positive)) if positive else 0.0


# ------------------------------------------------------------------------------------ scoring
@dataclass
class RewardBatch:
    """Per-sample component scores of one scored batch (same order as the inputs)."""

    components: dict[str, list[float]]
    texts: list[str]  # recognised text (frames joined by " | " for videos)
    failures: int = 0  # images whose OCR raised (scored 0)
    failed_indices: list[int] = field(default_factory=list)

    @staticmethod
    def concat(parts: Sequence[RewardBatch]) -> RewardBatch:
        names = parts[0].components.keys() if parts else ()
        offset, failed = 0, []
        for p in parts:
            failed += [offset + i for i in p.failed_indices]
            offset += len(p.texts)
        return RewardBatch({n: [v for p in parts for v in p.components[n]] for n in names},
                           [t for p in parts for t in p.texts], sum(p.failures for p in parts), failed)


class OcrReward:
    """Scores images (RGB uint8 [H, W, 3]) or videos ([F, H, W, 3], every `frame_stride`-th frame)
    against their prompts' quoted text with one OCR engine; returns every component in
    REWARD_COMPONENTS (they all come from the same OCR pass), plus `ocr_ctc` when the engine has a
    recogniser likelihood (`engine.supports_likelihood`)."""

    def __init__(self, engine: OcrEngine, frame_stride: int = 1) -> None:
        if frame_stride < 1:
            raise ValueError(f"frame_stride={frame_stride}: expected a positive integer")
        self.engine = engine
        self.frame_stride = frame_stride

    def _frames(self, item: np.ndarray) -> list[np.ndarray]:
        item = np.asarray(item)
        if item.ndim == 3:
            return [item]
        if item.ndim == 4:
            return list(item[:: self.frame_stride])
        raise OcrError(f"expected an image [H, W, 3] or a video [F, H, W, 3]; got shape {tuple(item.shape)}")

    def _read_all(self, frames: list[np.ndarray]) -> list[str | None]:
        """Text per frame; one batched call, and on failure one frame at a time (None = failed)."""
        try:
            return list(self.engine.read(frames))
        except OcrError:
            pass
        texts: list[str | None] = []
        for frame in frames:
            try:
                texts.append(self.engine.read([frame])[0])
            except OcrError as exc:
                log.warning("OCR failed on one image (reward 0): %s", exc)
                texts.append(None)
        return texts

    def _likelihood_all(self, frames: list[np.ndarray], targets: list[str]) -> list[float | None]:
        """`ocr_ctc` per frame; one batched call, and on failure one frame at a time (None = failed)."""
        try:
            return list(self.engine.likelihood(frames, targets))
        except OcrError:
            pass
        scores: list[float | None] = []
        for frame, target in zip(frames, targets):
            try:
                scores.append(self.engine.likelihood([frame], [target])[0])
            except OcrError as exc:
                log.warning("OCR likelihood failed on one image (reward 0): %s", exc)
                scores.append(None)
        return scores

    def __call__(self, items: Sequence[np.ndarray], prompts: Sequence[str]) -> RewardBatch:
        if len(items) != len(prompts):
            raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
        targets = [target_text(p) for p in prompts]
        per_item, failed = [], []
        frames: list[np.ndarray] = []
        for i, item in enumerate(items):
            try:
                fs = self._frames(item)
            except OcrError as exc:
                log.warning("sample %d cannot be scored (reward 0): %s", i, exc)
                fs = []
                failed.append(i)
            per_item.append((len(frames), len(fs)))
            frames.extend(fs)
        texts = self._read_all(frames)
        dense = getattr(self.engine, "supports_likelihood", False)
        likelihoods: list[float | None] = []
        if dense and frames:
            frame_targets = [t for (_, n), t in zip(per_item, targets) for _ in range(n)]
            likelihoods = self._likelihood_all(frames, frame_targets)
        components: dict[str, list[float]] = {name: [] for name in REWARD_COMPONENTS}
        if dense:
            components[LIKELIHOOD_COMPONENT] = []
        joined = []
        for i, ((start, n), target) in enumerate(zip(per_item, targets)):
            item_texts = texts[start:start + n]
            if any(t is None for t in item_texts) and i not in failed:
                failed.append(i)
            joined.append(" | ".join(t or "" for t in item_texts))
            for name, fn in REWARD_COMPONENTS.items():
                scores = [fn(t, target) if t is not None else 0.0 for t in item_texts]
                components[name].append(video_frame_score(scores) if n != 1 else scores[0])
            if dense:
                item_scores = likelihoods[start:start + n]
                if any(s is None for s in item_scores) and i not in failed:
                    failed.append(i)
                scores = [s if s is not None else 0.0 for s in item_scores]
                components[LIKELIHOOD_COMPONENT].append(video_frame_score(scores) if n != 1 else scores[0])
        failed.sort()
        return RewardBatch(components, joined, len(failed), failed)

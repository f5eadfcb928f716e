"""Prompt sets for OCR-reward GRPO.

A prompt file holds one prompt per line with the text to render in double quotes (the Flow-GRPO
OCR format), e.g. `A storefront sign that reads "OPEN LATE"`. Blank lines are skipped; every other
line must have a quoted target, checked when the file is read so a bad line is reported with its
line number before any sampling. `synthetic_prompts` makes such prompts from a small word list for
demos and tests (deterministic for a seed).
"""
from __future__ import annotations

import random
from pathlib import Path

from .rewards import PromptError, check_prompts

WORDS = ("OPEN", "STOP", "EXIT", "SALE", "CAFE", "HELLO", "LANCE", "RAY", "DATA", "PARK", "TAXI", "BOOKS")
TEMPLATES = (
    'a sign that says "{}"',
    'a storefront with the word "{}" above the door',
    'a poster with the text "{}" in bold letters',
    'a neon sign reading "{}" at night',
)


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file (one per line, target text in double quotes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = [(i, line.strip()) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    prompts = [(i, line) for i, line in lines if line]
    if not prompts:
        raise PromptError(f"prompt file {path} has no prompts")
    check_prompts([p for _, p in prompts], [f"line {i}" for i, _ in prompts], source=f"prompt file {path}: ")
    return [p for _, p in prompts]


def synthetic_prompts(n: int, seed: int = 0, words: tuple[str, ...] = WORDS) -> list[str]:
    """`n` prompts drawn from TEMPLATES x `words` (with replacement once the pairs run out)."""
    if n < 1:
        raise ValueError(f"n={n}: expected a positive number of prompts")
    rng = random.Random(seed)
    pairs = [(t, w) for t in TEMPLATES for w in words]
    rng.shuffle(pairs)
    picked = pairs[:n] if n <= len(pairs) else [rng.choice(pairs) for _ in range(n)]
    return [t.format(w) for t, w in picked]

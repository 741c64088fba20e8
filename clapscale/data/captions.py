"""Caption choice: which text a sample contributes this epoch (``data.caption``).

- ``text``: one of the sample's captions (JSON ``text``).
- ``text_augment_t5`` / ``text_augment_all``: one of the keyword-to-caption captions stored under that
  JSON key; samples whose JSON lacks the key (sources without K2C augmentation, e.g. Clotho beside
  AudioSet) draw from ``text`` instead, as LAION-CLAP does when mixing such sources.
- ``tag_template``: "The sound of A, B and C" from the sample's tags (``normalise_tags``); samples
  without tags draw from ``text``.
- ``text_or_tags``: one of the sample's captions or its tag template, uniformly (e.g. a path caption
  "swordman die" one epoch, "The sound of scream" another); samples without tags draw from ``text``.
  Evaluation still takes the first caption of ``text``.

Training draws uniformly with the sample's per-epoch generator; evaluation takes the first caption.
"""

from __future__ import annotations

import numpy as np

CAPTION_MODES = ("text", "text_augment_t5", "text_augment_all", "tag_template", "text_or_tags")


class EmptyCaptionError(ValueError):
    """The sample has no usable caption (empty ``text`` list or only blank strings)."""


def clean_captions(value: object) -> list[str]:
    """The non-blank strings of a JSON caption field (a string counts as a one-item list)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def normalise_tags(meta: dict) -> tuple[list[str], str]:
    """The sample's tags as a list of non-blank strings, and a note ("" when the field was a clean list).

    Foreign shards spell the field three ways: ``tag`` (a list, ours and most LAION sources),
    ``tags`` (FSD50K, UrbanSound8K; read when ``tag`` is absent) and a bare value instead of a list.
    A string is one tag (iterating it made "dog" the tags d, o, g); a number (UrbanSound8K's class
    id) becomes its string; anything else (a dict, a nested list, a bool) is dropped. The note says
    what was coerced or dropped, so the loader can count it.
    """
    field = "tag" if "tag" in meta else "tags"
    value = meta.get(field)
    if value is None:
        return [], ""
    items = value if isinstance(value, list) else [value]
    tags: list[str] = []
    odd = not isinstance(value, list)
    for item in items:
        if isinstance(item, str):
            if item.strip():
                tags.append(item.strip())
            continue
        odd = True
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            tags.append(str(item))
    note = f"{field!r} is {value!r}, not a list of strings; read as {tags!r}" if odd else ""
    return tags, note


def tag_caption(tags: list[str]) -> str:
    """``["dog", "bark_loud", "rain"]`` -> ``"The sound of dog, bark loud and rain"``."""
    names = [t.replace("_", " ").strip() for t in tags if t and t.strip()]
    if not names:
        raise EmptyCaptionError("no tags to build a template caption from")
    if len(names) == 1:
        return f"The sound of {names[0]}"
    return f"The sound of {', '.join(names[:-1])} and {names[-1]}"


def choose_caption(meta: dict, mode: str, rng: np.random.Generator | None) -> str:
    """The caption one sample contributes (see module docstring). Raises ``EmptyCaptionError``."""
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption mode {mode!r} is not one of {', '.join(CAPTION_MODES)}")
    texts = clean_captions(meta.get("text"))
    if not texts:
        raise EmptyCaptionError("empty caption list")
    pool = texts
    if mode in ("text_augment_t5", "text_augment_all"):
        pool = clean_captions(meta.get(mode)) or texts
    elif mode == "tag_template":
        tags, _ = normalise_tags(meta)
        if tags:
            return tag_caption(tags)
    elif mode == "text_or_tags":
        tags, _ = normalise_tags(meta)
        if tags:
            pool = texts + [tag_caption(tags)]
    if rng is None:
        return pool[0]
    return pool[int(rng.integers(0, len(pool)))]

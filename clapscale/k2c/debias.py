"""Gender de-biasing of generated captions (LAION-CLAP section 3.5: "we replace 'woman' and 'man'
with 'person'").

Only nouns are rewritten, by whole word, keeping the word's capitalisation and any possessive
("A woman's voice" -> "A person's voice"). Pronouns (he, she, his, her) are left alone on purpose:
"she speaks" -> "they speaks" would trade a bias for broken grammar, and "her" is both object and
possessive. The list is ``GENDERED_WORDS``; every replacement is counted so that a run can report
how much it changed.
"""

from __future__ import annotations

import re
from collections import Counter

# gendered noun -> neutral noun (singular and plural listed separately: no guessing of plurals).
GENDERED_WORDS: dict[str, str] = {
    "man": "person", "men": "people", "woman": "person", "women": "people",
    "boy": "child", "boys": "children", "girl": "child", "girls": "children",
    "gentleman": "person", "gentlemen": "people", "lady": "person", "ladies": "people",
    "guy": "person", "guys": "people",
    "mother": "parent", "mothers": "parents", "father": "parent", "fathers": "parents",
    "son": "child", "sons": "children", "daughter": "child", "daughters": "children",
    "brother": "sibling", "brothers": "siblings", "sister": "sibling", "sisters": "siblings",
    "husband": "spouse", "husbands": "spouses", "wife": "spouse", "wives": "spouses",
    "boyfriend": "partner", "girlfriend": "partner",
    "fireman": "firefighter", "firemen": "firefighters", "policeman": "police officer",
    "policemen": "police officers", "policewoman": "police officer", "policewomen": "police officers",
}

_PATTERN = re.compile(r"\b(" + "|".join(sorted(GENDERED_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _same_case(word: str, neutral: str) -> str:
    if word.isupper() and len(word) > 1:
        return neutral.upper()
    if word[0].isupper():
        return neutral[0].upper() + neutral[1:]
    return neutral


def debias(text: str) -> tuple[str, Counter[str]]:
    """``text`` with every word of ``GENDERED_WORDS`` replaced, and a count per (lower-case) word
    replaced. ``"A man and a woman talk"`` -> ``("A person and a person talk", {"man": 1, "woman": 1})``."""
    counts: Counter[str] = Counter()

    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        counts[word.lower()] += 1
        return _same_case(word, GENDERED_WORDS[word.lower()])

    return _PATTERN.sub(repl, text), counts

"""Text from file paths for game sound libraries: cleaner captions and a keyword labeller.

LAION-Audio-630K's "file name as caption" sources and the Debian game sound packages this project
learns from both caption a clip with the words of its path. Raw, such captions are mostly storage
words: ``usr/share/games/megaglest/techs/megapack/commondata/sounds/archer_ack14.wav`` gives
"usr share games megaglest techs megapack commondata archer ack". ``clean_caption`` keeps the words
that can describe a sound and drops the rest:

- storage words (``STORAGE_WORDS``: data, sounds, audio, sfx, core, usr, share, ...),
- the package's and game's own names (they repeat on every clip of a package and say nothing about
  the sound; they would also let a model tell packages apart by name rather than by sound),
- numbers, single letters and file extensions,
- repeats (``swordman/sounds/swordman_die`` -> "swordman die").

``keyword_label`` maps a path to at most one class of a small sound vocabulary (``SOUND_CLASSES``)
by a documented, ordered keyword rule. Its labels are written into ``tag`` so zero-shot evaluation
has classes that are about the sound, not about the game. The rule is ordered because one path
often names both a source and an event: ``swordman_select`` is a unit's voice line (speech),
``swordman_die`` a death cry (scream), ``swordman_attack`` a sword; the first class whose keywords
occur wins.
"""

from __future__ import annotations

import re

__all__ = ["STORAGE_WORDS", "SOUND_CLASSES", "path_words", "clean_caption", "keyword_label"]

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEP = re.compile(r"[^A-Za-z0-9]+")

# Words that say where a file is kept or how it is encoded, never what it sounds like.
STORAGE_WORDS = frozenset(
    """
    usr share games game lib opt local data datas core base common commondata sound sounds sfx audio
    samples sample assets media files file raw misc wav ogg oga flac mp mp3 opus wv zip pk pk3 wz d
    techs tech megapack factions faction units unit tilesets tileset mods mod default extra extras
    public main mp pak mission missionpack baseoa resources res content packs pack
    """.split()
)

# Ordered: the first class whose keyword set meets the path's words is the label.
SOUND_CLASSES: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (name, frozenset(words.split()))
    for name, words in (
        ("speech", "voice voices voc taunt taunts speech talk say select ack yessir hello laugh laughs "
                   "chat cmndrvoc vtoltalk"),
        ("scream", "die dies death dying scream screams pain hurt ouch ow groan moan wail"),
        ("footsteps", "footstep footsteps step steps walk walking"),
        ("explosion", "explosion explosions explode explodes exploding explons blast bomb bombs grenade tnt "
                      "boom detonate detonation"),
        ("gunshot", "gun guns gunshot shot shots shotgun rifle pistol machinegun vulcan cannon laser railgun "
                    "plasma thunderstick bullet"),
        ("bow and arrow", "bow bows arrow arrows crossbow sling"),
        ("sword", "sword swords blade blades dagger knife axe mace hatchet slash"),
        ("door", "door doors gate fencegate"),
        ("water", "water splash rain river drip droplet bubble bubbles waves wave ocean underwater"),
        ("fire", "fire fires flame flames burn burning lava torch campfire"),
        ("horse", "horse horses gallop canter horseman"),
        ("animal", "wolf dog dogs cat cats chicken chickens pig pigs sheep cow cows bull bee bees snake "
                   "elephant eagle bird birds growl bat bats hiss bark howl"),
        ("magic spell", "magic spell spells summon heal holy faeriefire"),
        ("impact", "hit hits impact punch strike thud damage crash"),
        ("click", "click button menu beep checkbox"),
    )
)


def path_words(path: str) -> list[str]:
    """Lower-case words of a path: split on non-alphanumerics and camelCase, digits dropped.

    ``"Data/Sounds/voices/Default_uk/TakeCover2.ogg"`` ->
    ``["data", "sounds", "voices", "default", "uk", "take", "cover", "ogg"]``.
    """
    words = []
    for part in _SEP.split(path):
        for piece in _CAMEL.split(part):
            words += [w.lower() for w in re.split(r"\d+", piece) if w]
    return words


def _name_words(names: tuple[str, ...]) -> set[str]:
    return {w for n in names for w in path_words(n)}


def clean_caption(path: str, drop_names: tuple[str, ...] = ()) -> str:
    """The informative words of ``path`` as a caption ("" when none is left).

    Args:
        path: the file's path (absolute or relative; the extension is dropped).
        drop_names: package or game names whose words repeat on every clip (e.g.
            ``("megaglest-data", "megaglest")``); their words are dropped too.
    """
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", path)
    drop = STORAGE_WORDS | _name_words(drop_names)
    out: list[str] = []
    for w in path_words(stem):
        if len(w) < 2 or w in drop or w in out:
            continue
        out.append(w)
    return " ".join(out)


def keyword_label(path: str) -> str | None:
    """The sound class of ``path`` under the ordered rule in ``SOUND_CLASSES``, or None."""
    words = set(path_words(path))
    for name, keywords in SOUND_CLASSES:
        if words & keywords:
            return name
    return None

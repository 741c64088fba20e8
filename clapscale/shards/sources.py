"""Where clips come from: a folder of audio, a CSV/JSONL manifest, a dataset preset, the synthetic corpus.

Every source turns into a deterministic, sorted list of ``Item``s (cheap descriptions: a path and
captions, or a synthetic index). Decoding happens later in worker processes. An item that is
already known to be bad (no caption, a path escaping ``--root``, text that is not UTF-8) carries
its ``reject`` reason so that it is reported in rejects.jsonl instead of vanishing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from clapscale.shards import synthetic

# Extensions handed to libsndfile; anything else in a --from-dir tree is ignored (not rejected).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64", ".rf64"}
)
PRESETS = ("esc50", "us8k", "clotho", "audiocaps", "audioset")


class SourceError(ValueError):
    """A source as a whole is unusable (missing folder, unreadable manifest, wrong preset layout)."""


@dataclass
class Item:
    """One clip to build. Either ``path`` (a file) or ``synthetic_index`` is set."""

    split: str
    original: str  # what rejects.jsonl and the sample JSON call this clip (a path or id)
    path: str | None = None
    text: list[str] = field(default_factory=list)
    tag: list[str] = field(default_factory=list)
    source: str = "dir"
    licence: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    synthetic_index: int | None = None
    synthetic_seed: int = 0
    reject: str | None = None  # known-bad before decoding: the reason ...
    reject_code: str | None = None  # ... and its category for the summary
    key: str = ""  # assigned by ``assign_keys``
    image: str | None = None  # a JPEG stored with the clip as <key>.jpg (manifest column ``image``)
    synthetic_image: bool = False  # synthetic clips: store the rendered picture of their classes
    video_frames: int = 0  # > 0: ``path`` is a video; its audio track and this many frames (shards/video.py)
    frame_size: int = 224  # pixels of each stored frame tile (video)

    def fail(self, code: str, reason: str) -> "Item":
        self.reject_code, self.reject = code, reason
        return self

    def fingerprint(self) -> list[Any]:
        return ([self.split, self.original, self.path, self.text, self.tag, self.licence, self.extra,
                self.synthetic_index, self.synthetic_seed, self.reject, self.key]
                + ([self.image] if self.image else []) + (["synthetic_image"] if self.synthetic_image else [])
                + ([self.video_frames, self.frame_size] if self.video_frames else []))


# ----------------------------------------------------------------------------- captions

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPLIT = re.compile(r"[/_\-.\s]+")


# Folder names that say where a file is kept, not what it sounds like ("data/core/sounds/...").
GENERIC_FOLDER_WORDS = frozenset(
    {"data", "core", "sound", "sounds", "sfx", "audio", "samples", "sample", "assets", "media", "files", "raw", "misc",
     "wav", "ogg", "flac", "mp3"}
)


def _words(text: str) -> list[str]:
    words = []
    for part in _SPLIT.split(text):
        for piece in _CAMEL.split(part):
            piece = re.sub(r"\d+", " ", piece)
            words += [w.lower() for w in piece.split() if any(c.isalpha() for c in w)]
    return words


def caption_from_path(rel: str) -> str:
    """LAION's "file name as caption" rule: ``footsteps/Gravel_Run02.ogg`` -> ``"footsteps gravel run"``.

    Splits on ``/ _ - .``, whitespace and camelCase boundaries, drops digits, lower-cases; folder
    words in ``GENERIC_FOLDER_WORDS`` are dropped. Returns "" when nothing word-like is left (the
    clip is then rejected for an empty caption).
    """
    *folders, name = rel.replace(os.sep, "/").split("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    words = [w for folder in folders for w in _words(folder) if w not in GENERIC_FOLDER_WORDS]
    return " ".join(words + _words(stem))


def template_caption(tags: list[str]) -> str:
    """Label-only sources: ``["dog", "rain"]`` -> ``"The sound of dog and rain"``."""
    names = [t.replace("_", " ").strip() for t in tags if t.strip()]
    if not names:
        return ""
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"The sound of {listed}"


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text_problem(texts: Iterable[str]) -> str | None:
    for t in texts:
        if _has_surrogates(t):
            bad = t.encode("utf-8", "surrogateescape")
            return f"caption is not valid UTF-8: {bad!r}"
    return None


# ----------------------------------------------------------------------------- folder

def from_dir(root: Path, split: str = "train", video_frames: int = 0, frame_size: int = 224) -> list[Item]:
    """Every audio file under ``root`` (sorted, hidden files skipped), captioned from its path; with
    ``video_frames`` > 0 video files too (their audio track and that many frames: shards/video.py)."""
    from clapscale.shards.video import VIDEO_EXTENSIONS

    wanted = AUDIO_EXTENSIONS | (VIDEO_EXTENSIONS if video_frames > 0 else frozenset())
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"--from-dir {root}: not a directory")
    root = root.resolve()  # absolute paths: a rerun from another working directory is the same plan
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if name.startswith(".") or suffix not in wanted:
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            item = Item(split=split, original=rel, path=full, source=f"dir:{root.name}")
            if suffix not in AUDIO_EXTENSIONS:
                item.video_frames, item.frame_size = video_frames, frame_size
            if _has_surrogates(rel):
                item.original = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                item.fail("bad_text_encoding", f"file name is not valid UTF-8: {os.fsencode(rel)!r}")
            else:
                caption = caption_from_path(rel)
                if caption:
                    item.text = [caption]
                else:
                    item.fail("empty_caption", f"empty caption: no words in the path {rel!r}")
            items.append(item)
    return items


# ----------------------------------------------------------------------------- manifest

_PATH_COLS = ("path", "file", "filename", "file_name", "audio")
_TEXT_COLS = ("caption", "text", "captions")
_TAG_COLS = ("tags", "tag", "labels", "label")
_LICENCE_COLS = ("licence", "license")
# Optional DESIGN.md fields a manifest may carry into the sample JSON unchanged.
_PASS_THROUGH = ("text_augment_t5", "text_augment_all")


def _first(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


def _as_list(value: Any, sep: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    s = str(value).strip()
    if not s:
        return []
    if sep is None:
        return [s]
    return [p.strip() for p in re.split(sep, s) if p.strip()]


def resolve_under(root: Path, rel: str) -> Path:
    """``root / rel`` resolved; raises ``ValueError`` when it leaves ``root`` (``..``, absolute, symlink)."""
    root_r = Path(root).resolve()
    target = (root_r / rel).resolve()
    if target != root_r and root_r not in target.parents:
        raise ValueError(f"path {rel!r} escapes --root {root}")
    return target


def _read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    # surrogateescape keeps undecodable bytes so that only the affected rows are rejected.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append({"__error__": f"line {lineno}: invalid JSON ({exc.msg})", "__line__": lineno})
                continue
            if not isinstance(row, dict):
                rows.append({"__error__": f"line {lineno}: expected a JSON object", "__line__": lineno})
                continue
            row["__line__"] = lineno
            rows.append(row)
        return rows
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise SourceError(f"--from-manifest {path}: no header row")
        rows = []
        for lineno, row in enumerate(reader, 2):
            row = {(k or "").strip().lower(): v for k, v in row.items()}
            captions = [row.pop(k) for k in sorted(row) if re.fullmatch(r"caption_?\d+", k)]
            if captions and not row.get("caption"):
                row["caption"] = [c for c in captions if c and c.strip()]
            row["__line__"] = lineno
            rows.append(row)
        return rows
    raise SourceError(f"--from-manifest {path}: unknown manifest type {suffix!r}; use .csv, .tsv or .jsonl")


def from_manifest(manifest: Path, root: Path | None = None, default_split: str = "train") -> list[Item]:
    """Rows of a CSV/TSV/JSONL manifest: ``path`` (relative to ``root``), ``caption`` / ``text``
    (one string, or a JSON list; CSV may use ``caption_1..caption_N``), or ``tags`` only (CSV:
    separated by ``,`` or ``;``) for a template caption, optional ``split``, ``id``, ``licence``,
    ``text_augment_t5`` / ``text_augment_all`` (keyword-to-caption augmentations, copied as given),
    ``image`` (a JPEG relative to ``root``: the clip's picture or video frame, stored as ``<key>.jpg``).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise SourceError(f"--from-manifest {manifest}: no such file")
    root = Path(root) if root is not None else manifest.parent
    if not root.is_dir():
        raise SourceError(f"--root {root}: not a directory")
    items = []
    for row in _read_manifest_rows(manifest):
        where = f"{manifest.name}:{row.get('__line__')}"
        if "__error__" in row:
            items.append(Item(split=default_split, original=where, source="manifest").fail("bad_manifest_row", row["__error__"]))
            continue
        rel = _first(row, _PATH_COLS)
        split = str(row.get("split") or default_split).strip()
        item = Item(split=split, original=str(rel) if rel else where, source=f"manifest:{manifest.stem}")
        licence = _first(row, _LICENCE_COLS)
        item.licence = str(licence) if licence else None
        if row.get("id") not in (None, ""):
            item.extra["id"] = str(row["id"])
        for name in _PASS_THROUGH:
            if row.get(name) not in (None, "", []):
                item.extra[name] = row[name]
        items.append(item)
        if not rel:
            item.fail("bad_manifest_row", f"{where}: no path column (expected one of {', '.join(_PATH_COLS)})")
            continue
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", split):
            item.fail("bad_manifest_row", f"{where}: invalid split name {split!r}")
            continue
        try:
            item.path = str(resolve_under(root, str(rel)))
        except ValueError as exc:
            item.fail("path_escapes_root", f"{where}: {exc}")
            continue
        if not os.path.isfile(item.path):
            item.fail("missing_file", f"{where}: no such file {item.path}")
            continue
        image = row.get("image")
        if image not in (None, ""):
            try:
                item.image = str(resolve_under(root, str(image)))
            except ValueError as exc:
                item.fail("path_escapes_root", f"{where}: image: {exc}")
                continue
            if not os.path.isfile(item.image):
                item.fail("missing_image", f"{where}: no such image file {item.image}")
                continue
        item.text = _as_list(_first(row, _TEXT_COLS), None)
        item.tag = _as_list(_first(row, _TAG_COLS), r"[;,]")
        if not item.text and item.tag:
            item.text = [template_caption(item.tag)]
        problem = _text_problem(item.text + item.tag + [str(rel)])
        if problem:
            item.fail("bad_text_encoding", f"{where}: {problem}")
            item.original = str(rel).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        elif not item.text:
            item.fail("empty_caption", f"{where}: missing or empty caption (give a caption/text column or tags)")
    return items


# ----------------------------------------------------------------------------- presets

def _read_csv(path: Path) -> list[dict[str, str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Some dataset metadata files (Clotho's) are Latin-1; this is a whole-file property.
        text = raw.decode("latin-1")
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"preset: expected {what} at {path}; is this the dataset's own downloaded folder?")
    return path


def _labelled_item(split: str, path: Path, rel: str, label: str, source: str, extra: dict[str, Any]) -> Item:
    item = Item(split=split, original=rel, path=str(path), tag=[label], text=[template_caption([label])],
                source=source, extra=extra)
    if not path.exists():
        item.fail("missing_file", f"audio file listed in the metadata is missing: {path}")
    return item


def preset_esc50(root: Path) -> list[Item]:
    """ESC-50 (``meta/esc50.csv``: filename, fold, target, category, esc10, src_file, take; ``audio/``).

    One split per fold, ``fold1`` .. ``fold5``; the label is ``category`` (e.g. ``chirping_birds``).
    """
    root = Path(root)
    rows = _read_csv(_need(root / "meta" / "esc50.csv", "meta/esc50.csv"))
    return [
        _labelled_item(f"fold{r['fold']}", root / "audio" / r["filename"], f"audio/{r['filename']}", r["category"], "esc50",
                       {"fold": int(r["fold"]), "target": int(r["target"]), "esc10": r.get("esc10") == "True"})
        for r in rows
    ]


def preset_us8k(root: Path) -> list[Item]:
    """UrbanSound8K (``metadata/UrbanSound8K.csv``: slice_file_name, fsID, start, end, salience,
    fold, classID, class; ``audio/fold<k>/``). One split per fold, ``fold1`` .. ``fold10``."""
    root = Path(root)
    rows = _read_csv(_need(root / "metadata" / "UrbanSound8K.csv", "metadata/UrbanSound8K.csv"))
    out = []
    for r in rows:
        rel = f"audio/fold{r['fold']}/{r['slice_file_name']}"
        out.append(_labelled_item(f"fold{r['fold']}", root / rel, rel, r["class"], "us8k",
                                  {"fold": int(r["fold"]), "class_id": int(r["classID"]), "salience": int(r["salience"])}))
    return out


_CLOTHO_SPLITS = (("development", "train"), ("validation", "valid"), ("evaluation", "test"))


def preset_clotho(root: Path) -> list[Item]:
    """Clotho v2 (``clotho_captions_<part>.csv``: file_name, caption_1..caption_5; audio in
    ``<part>/``; optional ``clotho_metadata_<part>.csv`` for licences). Parts development /
    validation / evaluation become splits train / valid / test; 5 captions per clip."""
    root = Path(root)
    out = []
    found = False
    for part, split in _CLOTHO_SPLITS:
        cap_csv = root / f"clotho_captions_{part}.csv"
        if not cap_csv.exists():
            continue
        found = True
        licences = {}
        meta_csv = root / f"clotho_metadata_{part}.csv"
        if meta_csv.exists():
            licences = {r["file_name"]: r.get("license") for r in _read_csv(meta_csv)}
        for r in _read_csv(cap_csv):
            captions = [r[k] for k in sorted(r) if k.startswith("caption_") and r[k]]
            rel = f"{part}/{r['file_name']}"
            item = Item(split=split, original=rel, path=str(root / rel), text=captions, source="clotho",
                        licence=licences.get(r["file_name"]) or None)
            if not (root / rel).exists():
                item.fail("missing_file", f"audio file listed in {cap_csv.name} is missing: {root / rel}")
            elif not captions:
                item.fail("empty_caption", f"{cap_csv.name}: no captions for {r['file_name']}")
            out.append(item)
    if not found:
        raise SourceError(f"preset clotho: no clotho_captions_{{development,validation,evaluation}}.csv in {root}")
    return out


_AUDIOCAPS_SPLITS = (("train", "train"), ("val", "valid"), ("test", "test"))


def audio_files_by_stem(root: Path) -> dict[str, Path]:
    """Every audio file anywhere under ``root`` by file stem (the first in sorted walk order wins)."""
    by_stem: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() in AUDIO_EXTENSIONS:
                by_stem.setdefault(p.stem, p)
    return by_stem


def youtube_clip_stems(yid: str, start: str, end: float) -> list[str]:
    """File stems the usual AudioSet / AudioCaps download scripts give a YouTube segment:
    ``<id>``, ``<id>_<start>``, ``<id>_<start>.000_<end>.000``, ``<id>_<start>_<end>`` (s or ms)."""
    start_f = float(start) if start else 0.0
    return list(dict.fromkeys([
        yid, f"{yid}_{int(start_f)}", f"{yid}_{start}", f"{yid}_{start_f:.3f}_{end:.3f}",
        f"{yid}_{int(start_f)}_{int(end)}", f"{yid}_{int(start_f * 1000)}_{int(end * 1000)}",
    ]))


def find_youtube_clip(by_stem: dict[str, Path], names: list[str]) -> Path | None:
    """The first of ``names`` (each also with AudioSet's ``Y`` prefix) that is a file stem under the root."""
    return next((by_stem[n] for n in names + ["Y" + n for n in names] if n in by_stem), None)


def preset_audiocaps(root: Path) -> list[Item]:
    """AudioCaps (``train.csv`` / ``val.csv`` / ``test.csv``: audiocap_id, youtube_id, start_time,
    caption). AudioCaps ships no audio: files are found anywhere under ``root`` by stem
    ``<youtube_id>``, ``<youtube_id>_<start>`` or AudioSet's ``<youtube_id>_<start>.000_<end>.000``,
    each with or without AudioSet's ``Y`` prefix (the usual download scripts' names). Rows of one clip are grouped, so test/val clips carry their 5 captions."""
    root = Path(root)
    if not any((root / f"{p}.csv").exists() for p, _ in _AUDIOCAPS_SPLITS):
        raise SourceError(f"preset audiocaps: none of train.csv, val.csv, test.csv in {root}")
    by_stem = audio_files_by_stem(root)
    out = []
    for part, split in _AUDIOCAPS_SPLITS:
        cap_csv = root / f"{part}.csv"
        if not cap_csv.exists():
            continue
        groups: dict[tuple[str, str], list[dict[str, str]]] = {}
        for r in _read_csv(cap_csv):
            groups.setdefault((r["youtube_id"], r["start_time"]), []).append(r)
        for (yid, start), rows in groups.items():
            start_f = float(start) if start else 0.0
            names = youtube_clip_stems(yid, start, start_f + 10)
            path = find_youtube_clip(by_stem, names)
            captions = [r["caption"] for r in rows if r.get("caption")]
            item = Item(split=split, original=f"youtube:{yid}@{start}", path=str(path) if path else None, text=captions,
                        source="audiocaps", extra={"youtube_id": yid, "start_time": start,
                                                   "audiocap_id": [r["audiocap_id"] for r in rows]})
            if path is None:
                item.fail("missing_file", f"no audio file for youtube_id {yid} under {root} (looked for {', '.join(names)}, "
                                          "with or without a 'Y' prefix)")
            elif not captions:
                item.fail("empty_caption", f"{cap_csv.name}: no caption for youtube_id {yid}")
            out.append(item)
    return out


AUDIOSET_PARTS = (("balanced_train_segments", "train"), ("unbalanced_train_segments", "train"), ("eval_segments", "eval"))
AUDIOSET_LABELS = "class_labels_indices.csv"


def read_audioset_segments(path: Path) -> list[tuple[str, str, str, list[str]]]:
    """An AudioSet segment CSV -> ``(ytid, start, end, [mid, ...])`` rows.

    The official files start with ``#`` comment lines (creation date, counts, the column names),
    put a space after each comma and quote the comma-separated label list:
    ``--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"``.
    """
    rows = []
    text = path.read_text(encoding="utf-8-sig")
    for lineno, fields in enumerate(csv.reader(io.StringIO(text), skipinitialspace=True), 1):
        if not fields or fields[0].lstrip().startswith("#"):
            continue
        if fields[0].strip() == "YTID" and not rows:  # a plain header line (re-distributed copies)
            continue
        if len(fields) != 4:
            raise SourceError(f"preset audioset: {path.name}:{lineno}: expected 4 fields (YTID, start_seconds, "
                              f"end_seconds, positive_labels), got {len(fields)}")
        yid, start, end, labels = (f.strip() for f in fields)
        try:
            float(start), float(end)
        except ValueError:
            raise SourceError(f"preset audioset: {path.name}:{lineno}: start/end seconds are not numbers: "
                              f"{start!r}, {end!r}") from None
        rows.append((yid, start, end, [m.strip() for m in labels.split(",") if m.strip()]))
    return rows


def read_ytid_list(path: Path) -> set[str]:
    """YouTube ids to exclude: one a line (``#`` comments), or a CSV with a ``youtube_id`` / ``YTID``
    column (AudioCaps' train/val/test.csv as downloaded)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"--exclude-ytids {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    first = text.split("\n", 1)[0].lower()
    if "," in first and ("youtube_id" in first or "ytid" in first):
        rows = list(csv.DictReader(io.StringIO(text), skipinitialspace=True))
        col = next(c for c in rows[0] if c.strip().lower() in ("youtube_id", "ytid")) if rows else None
        return {r[col].strip() for r in rows if col and r.get(col, "").strip()}
    return {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}


def preset_audioset(root: Path, drop_mids: Iterable[str] = (), exclude_ytids: Iterable[str] = ()) -> list[Item]:
    """AudioSet as downloaded: ``balanced_train_segments.csv`` / ``unbalanced_train_segments.csv``
    (split ``train``) and ``eval_segments.csv`` (split ``eval``), ``class_labels_indices.csv``
    (index, mid, display_name), audio anywhere under ``root`` named by YouTube id (see
    ``youtube_clip_stems``; clips that were never downloaded are rejected as ``missing_file``).

    Tags are the display names, the caption the template ("The sound of Speech and Music");
    ``clapscale k2c`` adds keyword-to-caption captions later. Each clip records ``youtube_id``,
    ``start``, ``end``, ``mids`` and ``audioset_part``. ``drop_mids``: labels removed from every
    clip (a clip left without labels is rejected as ``all_labels_dropped``); ``exclude_ytids``:
    clips rejected as ``excluded_ytid`` (evaluation sets that overlap AudioSet: AudioCaps).
    """
    root = Path(root)
    names = {r["mid"]: r["display_name"] for r in _read_csv(_need(root / AUDIOSET_LABELS, AUDIOSET_LABELS))}
    drop, excluded = set(drop_mids), set(exclude_ytids)
    unknown = sorted(drop - set(names))
    if unknown:
        raise SourceError(f"--drop-mids: {', '.join(unknown)} not in {AUDIOSET_LABELS} (mids look like /m/09x0r)")
    parts = [(part, split) for part, split in AUDIOSET_PARTS if (root / f"{part}.csv").exists()]
    if not parts:
        raise SourceError(f"preset audioset: none of {', '.join(p + '.csv' for p, _ in AUDIOSET_PARTS)} in {root}")
    by_stem = audio_files_by_stem(root)
    out, seen = [], set()
    for part, split in parts:
        for yid, start, end, mids in read_audioset_segments(root / f"{part}.csv"):
            if (yid, start) in seen:  # a segment listed twice (balanced is drawn from the same pool)
                continue
            seen.add((yid, start))
            kept = [m for m in mids if m not in drop]
            item = Item(split=split, original=f"youtube:{yid}@{start}", source="audioset",
                        tag=[names.get(m, m) for m in kept],
                        extra={"youtube_id": yid, "start": float(start), "end": float(end), "mids": kept,
                               "audioset_part": part.removesuffix("_segments")})
            item.text = [template_caption(item.tag)] if item.tag else []
            out.append(item)
            path = find_youtube_clip(by_stem, youtube_clip_stems(yid, start, float(end)))
            if yid in excluded:
                item.fail("excluded_ytid", f"youtube_id {yid} is in --exclude-ytids")
            elif path is None:
                item.fail("missing_file", f"no audio file for youtube_id {yid} under {root} "
                                          f"(looked for {yid}[_{start}[_{end}]] with or without a 'Y' prefix)")
            elif not kept:
                item.fail("all_labels_dropped", f"youtube_id {yid}: every label ({', '.join(mids)}) is in --drop-mids")
            else:
                item.path = str(path)
            unknown_mids = [m for m in kept if m not in names]
            if unknown_mids and not item.reject:
                item.fail("unknown_label", f"youtube_id {yid}: labels {unknown_mids} not in {AUDIOSET_LABELS}")
    return out


def from_preset(name: str, root: Path, **options: Any) -> list[Item]:
    """The items of dataset preset ``name`` in its downloaded folder ``root``; ``options`` go to
    presets that take them (audioset: ``drop_mids``, ``exclude_ytids``)."""
    builders = {"esc50": preset_esc50, "us8k": preset_us8k, "clotho": preset_clotho, "audiocaps": preset_audiocaps,
                "audioset": preset_audioset}
    if name not in builders:
        raise SourceError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if not Path(root).is_dir():
        raise SourceError(f"--preset {name} {root}: not a directory")
    if options and name != "audioset":
        raise SourceError(f"--preset {name}: {', '.join('--' + k.replace('_', '-') for k in options)} apply to "
                          "--preset audioset only")
    return builders[name](Path(root), **options)


# ----------------------------------------------------------------------------- synthetic

def from_synthetic(total: int, seed: int = 0, images: bool = False) -> list[Item]:
    """``total`` synthetic clips divided 80/10/10 into train / valid / test; ``images``: each with the
    rendered picture of its classes (``synthetic.render_picture``) as ``<key>.jpg``."""
    items = []
    for split, n in synthetic.split_counts(total).items():
        for i in range(n):
            items.append(Item(split=split, original=f"synthetic:{split}:{seed}:{i}", source="synthetic",
                              synthetic_index=i, synthetic_seed=seed, extra={"corpus_version": synthetic.CORPUS_VERSION},
                              synthetic_image=images))
    return items


# ----------------------------------------------------------------------------- keys

def _slug(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text.rsplit(".", 1)[0] if "/" in text or "." in text else text).strip("_")
    return s[:limit].strip("_") or "clip"


def assign_keys(items: list[Item]) -> None:
    """Keys ``<split index, 7 digits>-<slug of the original>``: unique, dot-free, sorted like the items."""
    counters: dict[str, int] = {}
    for item in items:
        i = counters.get(item.split, 0)
        counters[item.split] = i + 1
        if item.synthetic_index is not None:
            item.key = f"syn-{item.split}-{item.synthetic_index:07d}"
        else:
            item.key = f"{i:07d}-{_slug(item.original)}"

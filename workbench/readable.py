"""Which image files TensorFlow will decode, found before training, without TensorFlow.

A file whose first bytes look right can still fail to decode (a truncated or corrupt JPEG). tf.data would
drop it silently at every epoch, with only libjpeg's bare messages on stderr; checking every file up front
lets the scan count and name what is skipped, and refuse a class that has nothing left.

How: Pillow decodes each file, as TensorFlow would with the same libjpeg / libpng / giflib (checked against
tf.io.decode_image on truncated files, corrupt bodies and every Pillow colour mode), JPEGs in draft mode
(libjpeg scales by 1/8 while decoding: the whole stream is still parsed, at a fraction of the cost). Files
are checked on threads (Pillow releases the GIL while decoding; threads, unlike forked processes, are
safe in a study worker that has TensorFlow loaded). The answers are cached per folder under the user's
cache folder, keyed by each file's size and modification time, so a second scan of the same folder only
stats its files. tf.data's ignore_errors stays as the last guard for anything this check lets through.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workbench.config import first_line

# First bytes of each format tf.io.decode_image reads.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
NOT_AN_IMAGE = "not a JPEG, PNG, GIF or BMP file"
_PILLOW_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # "JPEG" opens cameras' MPO files too (their first picture)
_READ_ERROR = "cannot read: "
_CACHE_VERSION = 1  # bump when the check changes: older answers are then ignored


def check(root: Path, files: Iterable[Path]) -> dict[Path, str | None]:
    """For each file under `root`: None when TensorFlow will decode it, else why not (one line)."""
    files = list(files)
    cache_file = _cache_file(root)
    cached = _read_cache(cache_file)
    answers: dict[Path, str | None] = {}
    stats: dict[Path, tuple[int, int]] = {}
    todo = []
    for path in files:
        try:
            st = path.stat()
        except OSError as exc:
            answers[path] = f"{_READ_ERROR}{exc.strerror}"
            continue
        stats[path] = (st.st_size, st.st_mtime_ns)
        hit = cached.get(_key(root, path))
        if isinstance(hit, list) and len(hit) == 3 and tuple(hit[:2]) == stats[path]:
            answers[path] = hit[2]
        else:
            todo.append(path)
    if todo:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=min(len(todo), 2 * cores)) as pool:  # reads overlap decoding
            answers.update(zip(todo, pool.map(why_unreadable, todo), strict=True))
        # What the file holds is cached, not a read error (a permission fixed later changes no mtime).
        # Other entries stay: a scan of train/ alone must not forget val/.
        fresh = {_key(root, p): [*stats[p], answers[p]] for p in todo if not str(answers[p]).startswith(_READ_ERROR)}
        _write_cache(cache_file, cached | fresh)
    return answers


def why_unreadable(path: Path) -> str | None:
    """None when tf.io.decode_image(channels=3) decodes the file, else the reason, in one line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with path.open("rb") as f:
            head = f.read(32)
            if not head.startswith(SIGNATURES):
                return NOT_AN_IMAGE
            if head.startswith(b"BM"):
                # TensorFlow's BMP decoder reads 8, 24 and 32 bits per pixel only; Pillow reads more.
                bits = struct.unpack_from("<H", head, 28)[0] if len(head) >= 30 else 0
                if bits not in (8, 24, 32):
                    return f"a {bits}-bit BMP; TensorFlow reads 8, 24 and 32-bit BMPs"
            f.seek(0)
            with Image.open(f, formats=_PILLOW_FORMATS) as image:
                image.draft("RGB", (1, 1))  # JPEG: decode at the smallest scale; other formats ignore it
                image.load()
    except Image.DecompressionBombError:
        return None  # a huge image, not a broken one: TensorFlow has no such limit
    except UnidentifiedImageError:
        return NOT_AN_IMAGE
    except OSError as exc:
        return f"{_READ_ERROR}{exc.strerror}" if exc.strerror else f"cannot decode: {first_line(exc)}"
    except Exception as exc:
        return f"cannot decode: {first_line(exc)}"
    return None


# --- cache -------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "workbench" / "readable"


def _cache_file(root: Path) -> Path:
    from PIL import __version__ as pillow

    folder = str(root.resolve())
    # Another Pillow may decode differently: its answers are kept apart.
    return cache_dir() / f"{hashlib.sha256(folder.encode()).hexdigest()[:16]}-v{_CACHE_VERSION}-pil{pillow}.json"


def _key(root: Path, path: Path) -> str:
    # String slicing: Path.relative_to costs more than the stat of the file (about 0.1 ms).
    return str(path).removeprefix(os.path.join(str(root), ""))


def _read_cache(path: Path) -> dict[str, list]:
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: check every file again


def _write_cache(path: Path, entries: dict[str, list]) -> None:
    # Written whole and renamed into place: runs scanning the same folder at once never see half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only home: the next scan checks again, nothing worse

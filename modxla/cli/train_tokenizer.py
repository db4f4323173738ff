"""Train a sentencepiece tokenizer on a data source and save it.

    modxla-train-tokenizer --config configs/tiny.yaml --out tok.model [key=value ...]

The source, vocabulary size (model.vocab_size) and model type (data.tokenizer_type) come from
the config; point data.tokenizer at the result to use it.
"""

from __future__ import annotations

import sys
import time

from modxla.cli.common import parser
from modxla.config import load_config
from modxla.data import load_documents, train_tokenizer
from modxla.errors import UserError, report


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-train-tokenizer", __doc__)
    ap.add_argument("--config", help="YAML config (defaults when omitted)")
    ap.add_argument("--out", required=True, help="output .model path")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        t0 = time.perf_counter()
        path = train_tokenizer(
            load_documents(cfg.data),
            args.out,
            cfg.model.vocab_size,
            cfg.data.tokenizer_type,
            max_chars=cfg.data.max_chars,
        )
    except UserError as e:
        return report(e)
    print(f"wrote {path} ({cfg.model.vocab_size} pieces, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

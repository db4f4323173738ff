"""Train a sentencepiece tokenizer (the `modxla-train-tokenizer` command; modxla/cli/)."""

import sys

from modxla.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())

"""Tokenize a dataset into shards: the same as `ultimate-trainer prepare-data`.

Example:
    python tools/prepare_data.py --data-dir data/pydoc
    python -m ultimate_trainer --model-preset nano --data-dir data/pydoc
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ultimate_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare-data", *sys.argv[1:]]))

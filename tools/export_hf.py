"""Writes a checkpoint as a Hugging Face transformers model: `ultimate-trainer export`.

Example:
    python tools/export_hf.py --checkpoint output_ultimate/checkpoint-159 --output nano-hf
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ultimate_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))

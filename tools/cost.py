"""What a run will cost: the same as `ultimate-trainer cost` (docs/cost.md).

Example:
    python tools/cost.py --model-preset small --total-tokens 1B --device-type h100 --devices 8
    python tools/cost.py --recipe ttt-125m --devices 8 --device-type a100 --wall-time 2.7h
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ultimate_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["cost", *sys.argv[1:]]))

"""Hyperparameter search of the MLP: python search/tune_mlp.py --num-samples 50"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from text_recognizer.cli import tune_mlp as main  # noqa: E402

if __name__ == "__main__":
    main()

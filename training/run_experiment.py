"""Train one model: python training/run_experiment.py --model_class=MLP --data_class=MNIST --max_epochs=5"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from text_recognizer.cli import run_experiment as main  # noqa: E402

if __name__ == "__main__":
    main()

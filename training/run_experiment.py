"""Train one model: python training/run_experiment.py --model_class=MLP --data_class=MNIST --max_epochs=5"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from text_recognizer.training import fit, parse_args  # noqa: E402
from text_recognizer.util import UserError, check_versions, fail  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse flags, train, test; print test_acc and the best checkpoint. Returns the metrics."""
    try:
        check_versions()
        args = parse_args(argv)
        metrics = fit(args)
    except UserError as error:
        fail(f"run_experiment.py: error: {error}")
    print(f"test_acc={metrics['test_acc']:.4f}")
    print(f"best checkpoint: {metrics['best_model_path']}")
    return metrics


if __name__ == "__main__":
    main()

"""Use a trained model: the class of each image, and its probability.

    python -m text_recognizer.predict --checkpoint PATH image.png [image.png ...]    (or: text-recognizer-predict)

PATH is a checkpoint file (a single run's or a trial's) or a search folder, which means its best checkpoint.
Images may be any size and colour: they are converted to grayscale and resized to the model's input, then
normalized as in training (the normalization is read from the checkpoint).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from text_recognizer.facts import SUMMARY_FILE
from text_recognizer.models import MODEL_CLASSES
from text_recognizer.util import Parser, UserError, fail


def checkpoint_file(path: Path) -> Path:
    """The checkpoint a path means: the file itself, or a search folder's best checkpoint."""
    if path.is_dir():
        summary = path / SUMMARY_FILE
        if not summary.is_file():
            raise UserError(f"--checkpoint {path}: a folder must be a search folder (no {SUMMARY_FILE} in it)")
        best = json.loads(summary.read_text()).get("best")
        if not best:
            raise UserError(f"--checkpoint {path}: the search has no best trial")
        return Path(best["checkpoint"])
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: no such file")
    return path


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint (in eval mode) and its data config (input dims, class names, normalization)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the user's to fix
        raise UserError(f"--checkpoint {path}: not a checkpoint ({type(error).__name__})") from None
    run_args, data_config = checkpoint.get("run_args"), checkpoint.get("data_config")
    if not isinstance(run_args, dict) or not data_config or run_args.get("model_class") not in MODEL_CLASSES:
        raise UserError(f"--checkpoint {path}: not a checkpoint of this project's models (no run args or data config)")
    model = MODEL_CLASSES[run_args["model_class"]](data_config=data_config, args=argparse.Namespace(**run_args))
    state = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items() if key.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(f"--checkpoint {path}: its weights don't fit a {run_args['model_class']} ({first})") from None
    return model.eval(), data_config


def read_image(path: Path, data_config: dict[str, Any]) -> torch.Tensor:
    """An image as the model's input (1, C, H, W): grayscale, resized to the model's size, normalized as in training."""
    channels, height, width = data_config["input_dims"]
    try:
        with Image.open(path) as image:
            image = image.convert("L")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(1, channels, height, width)
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"{path}: not a readable image ({type(error).__name__})") from None
    norm = data_config["normalization"]
    return (pixels.float() / 255.0 - norm["mean"]) / norm["std"]  # the same operations as the training data's


def predict(checkpoint: Path, images: Sequence[Path]) -> list[tuple[str, float]]:
    """The class name and probability of each image."""
    model, data_config = load_model(checkpoint_file(checkpoint))
    batch = torch.cat([read_image(path, data_config) for path in images])
    with torch.no_grad():
        probabilities = torch.softmax(model(batch), dim=1)
    best, index = probabilities.max(dim=1)
    return [(str(data_config["mapping"][i]), float(p)) for p, i in zip(best.tolist(), index.tolist(), strict=True)]


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float]]:
    parser = Parser(prog="predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file, or a search folder")
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    args = parser.parse_args(argv)
    try:
        predictions = predict(args.checkpoint, args.images)
    except UserError as error:
        fail(f"predict: error: {error}")
    width = max(len(str(path)) for path in args.images)
    for path, (name, probability) in zip(args.images, predictions, strict=True):
        print(f"{str(path):<{width}}  {name}  {probability:.3f}")
    return predictions


def command() -> None:
    """The console script: exit status 0 on success (main returns the predictions, which would be the status)."""
    main()


if __name__ == "__main__":
    main()

"""predict: a trained model's class for image files, the same as the model gives the test tensors in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from text_recognizer.data.mnist import FashionMNIST
from text_recognizer.predict import load_model, main
from text_recognizer.training import fit_and_test, parse_args


@pytest.fixture(scope="module")
def checkpoint(fashion_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MLP trained briefly on Fashion-MNIST by run_experiment's own function."""
    log_dir = tmp_path_factory.mktemp("logs")
    flags = ["--data_class=FashionMNIST", f"--data_dir={fashion_dir}", f"--log_dir={log_dir}", "--max_epochs=1"]
    metrics = fit_and_test(parse_args([*flags, "--limit_train_batches=30", "--fc1=64", "--fc2=32"]))
    return Path(metrics["best_model_path"])


def test_images_cut_from_the_test_set_get_the_models_classes(checkpoint: Path, fashion_dir: Path, tmp_path: Path) -> None:
    raw = FashionMNIST.raw_folder(fashion_dir) / "t10k-images-idx3-ubyte"
    pixels = np.fromfile(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:200]
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(image, mode="L").save(paths[-1])
    predicted = main(["--checkpoint", str(checkpoint), *map(str, paths)])
    model, config = load_model(checkpoint)
    tensors = torch.from_numpy(FashionMNIST.load_arrays(fashion_dir)["x_test"][:200])
    with torch.no_grad():
        expected = model(tensors).argmax(1).tolist()
    assert [name for name, _ in predicted] == [config["mapping"][i] for i in expected]
    assert all(0.1 <= probability <= 1 for _, probability in predicted)
    assert len({name for name, _ in predicted}) >= 5  # a model that learned something, not one class for all


def test_larger_colour_images_and_a_search_folder(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "big.jpg"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(image)
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"best": {"checkpoint": str(checkpoint)}}))
    ((name, probability),) = main(["--checkpoint", str(folder), str(image)])
    assert name in FashionMNIST.mapping and 0 < probability <= 1
    assert name in capsys.readouterr().out


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_images_and_checkpoints_are_one_line_errors(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "notes.png: not a readable image" in one_line_error(["--checkpoint", str(checkpoint), str(text)], capsys)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["run_args"]["fc1"] = 128  # the same layers, other sizes: another model's weights
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    assert "weights don't fit a MLP" in one_line_error(["--checkpoint", str(other), str(text)], capsys)
    assert "no such file" in one_line_error(["--checkpoint", str(tmp_path / "none.ckpt"), str(text)], capsys)

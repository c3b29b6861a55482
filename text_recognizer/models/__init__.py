"""Models, looked up by name: never imported from a user-given string."""

from torch import nn

from text_recognizer.models.mlp import MLP

MODEL_CLASSES: dict[str, type[nn.Module]] = {"MLP": MLP}

__all__ = ["MLP", "MODEL_CLASSES"]

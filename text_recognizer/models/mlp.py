"""A multi-layer perceptron: flatten -> fc1 -> ReLU -> dropout -> fc2 -> ReLU -> dropout -> fc3."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn

from text_recognizer.flags import DROPOUT, FC1_DIM, FC2_DIM  # its flags: flags.add_mlp_flags


class MLP(nn.Module):
    """Simple MLP built from the data config's input and mapping sizes."""

    def __init__(self, data_config: dict[str, Any], args: argparse.Namespace | None = None) -> None:
        super().__init__()
        args = vars(args) if args is not None else {}
        input_dim = math.prod(data_config["input_dims"])
        self.num_classes = num_classes = len(data_config["mapping"])
        fc1_dim = args.get("fc1", FC1_DIM)
        fc2_dim = args.get("fc2", FC2_DIM)
        self.dropout = nn.Dropout(args.get("dropout", DROPOUT))
        self.fc1 = nn.Linear(input_dim, fc1_dim)
        self.fc2 = nn.Linear(fc1_dim, fc2_dim)
        self.fc3 = nn.Linear(fc2_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.fc3(x)

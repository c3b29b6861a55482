"""A virtual environment here that sees only the GPU image's packages (image-packages.txt), to test the kit without a GPU.

    python benchmarks/device/image_venv.py /tmp/image-venv
    /tmp/image-venv/bin/python benchmarks/device/run.py --carry /tmp/carry311 --cpu-stand-in -- --samples 4 --max-t 2

The venv gets no packages of its own: a .pth file adds a folder of links to those packages installed here whose
names are in the image's list (torch, Lightning, pandas, ...), and nothing else. Ray, W&B, jsonschema, pydantic
and the rest the image lacks are then missing, as there, and `import ray` works only from the unpacked carry.
A stand-in: this machine's Python and versions, not the image's (3.12, torch 2.11).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

from build_carry import image_packages, normalize


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venv", type=Path)
    args = parser.parse_args(argv)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(args.venv)], check=True)
    image, site = image_packages(), Path(sysconfig.get_paths()["purelib"])
    links = args.venv / "image-site"
    links.mkdir()
    taken = []
    for dist in distributions():
        if normalize(dist.metadata["Name"]) not in image or not dist.files:
            continue
        taken.append(dist.metadata["Name"])
        for top in {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith("..")}:
            if (site / top).exists() and not (links / top).exists():
                (links / top).symlink_to(site / top)
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (args.venv / "lib" / python / "site-packages" / "image-site.pth").write_text(f"{links.resolve()}\n")
    print(f"{args.venv}: {len(taken)} of the image's {len(image)} packages are installed here and linked")
    return args.venv


if __name__ == "__main__":
    main()

"""Write elpv as a user's defect collection on disk: class folders, masks beside the images, one stray file.

    python experiments/baselines/elpv_as_folders.py /tmp/elpv_folders
    python train.py data=surface_defect data.source=folder data.root=/tmp/elpv_folders \
        data.good_classes=[p0,p33] backbone=vit_hybrid

Layout: ``<out>/<level>/<cell type>/cellNNNN.png`` with level p0, p33, p67, p100 (the defect probability of
``labels.csv``), an all-black ``cellNNNN_mask.png`` beside every defective image (left out by the default
``data.exclude`` globs) and ``<out>/README.png`` directly under the root (reported as outside every class
folder). ``good_classes=[p0,p33]`` gives the labels of ``source=elpv`` (defective when probability >= 0.5).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from lrk.data.sources import ELPV_LEVEL_NAMES, read_elpv_labels


def write_tree(out: Path) -> int:
    """Copy every elpv image into ``out``; returns the number of images written (masks not counted)."""
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or choose another folder")
    records = read_elpv_labels()
    for record in records:
        folder = out / ELPV_LEVEL_NAMES[record.level] / record.type
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record.path, folder / record.path.name)
        if record.level >= 2:
            with Image.open(record.path) as image:
                Image.new("L", image.size).save(folder / f"{record.path.stem}_mask.png")
    shutil.copyfile(records[0].path, out / "README.png")
    return len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to create")
    count = write_tree(parser.parse_args().out)
    print(f"wrote {count} images (+ masks, + one stray file) under the class folders p0, p33, p67, p100")


if __name__ == "__main__":
    main()

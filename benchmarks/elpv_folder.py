"""Write the elpv solar-cell set (PyPI ``elpv-dataset``) as a folder of classes.

The package ships 2,624 300x300 greyscale electroluminescence images of solar cells and, per
image, an expert's defect probability in {0, 1/3, 2/3, 1} (``labels.csv``). The four
probabilities are the four classes, as the data set's own benchmark (Deitsch et al. 2019) keeps
them: ``p0_functional``, ``p1of3``, ``p2of3``, ``p1_defective``. Images are linked, not copied
(copied where links are impossible).

Licence: the images are CC BY-NC-SA 4.0 (Buerhop-Lutz et al., EU PVSEC 2018; Deitsch et al.,
Solar Energy 2019 and Machine Vision and Applications 2021), the package's code Apache-2.0:
test data for non-commercial benchmarking only, never a dependency of the tool.

    python benchmarks/elpv_folder.py DIR
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CLASSES = {0.0: "p0_functional", 1 / 3: "p1of3", 2 / 3: "p2of3", 1.0: "p1_defective"}


def package_data() -> Path:
    """The folder of ``labels.csv`` and ``images/`` inside the installed package."""
    import elpv_dataset

    return Path(elpv_dataset.__file__).resolve().parent / "data"


def write(dest: Path) -> dict[str, int]:
    """``dest/<class>/cellNNNN.png`` for every image; returns images per class. Idempotent."""
    root = package_data()
    counts = dict.fromkeys(CLASSES.values(), 0)
    for line in (root / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        path, prob, _kind = line.split()
        cls = min(CLASSES.items(), key=lambda kv: abs(kv[0] - float(prob)))[1]
        src = root / path
        link = dest / cls / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                link.symlink_to(src)
            except OSError:
                shutil.copyfile(src, link)
        counts[cls] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    counts = write(args.dest)
    print(f"{args.dest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

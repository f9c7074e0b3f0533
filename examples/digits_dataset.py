"""An offline detection dataset in COCO format: scikit-learn's handwritten digits pasted onto crops
of its sample photos.

Real data that ships inside a PyPI wheel, so that the example needs no download: the 8x8
digits of ``sklearn.datasets.load_digits`` (10 classes, 1,797 samples) are upscaled to random
sizes and pasted, as dark or light ink, onto random crops of ``load_sample_images`` (two
427x640 photos). Deterministic for a seed; train and val use disjoint digit samples. Each
annotation has the digit's box (its inked extent) and its mask (the inked pixels, as COCO
uncompressed RLE), so the set trains Mask R-CNN as well.

    python examples/digits_dataset.py --out data/digits   # writes data/digits/<parameters>/{images/,train.json,val.json}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _load_sources():
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    return digits.images / 16.0, digits.target, [np.asarray(img) for img in load_sample_images().images]


# Bump when the generated files change for the same parameters, so that old caches are not reused.
FORMAT_VERSION = 2


def _paste_digits(rng, photo, digit_images, digit_labels, image_size, max_objects):
    """One image, its boxes (x1, y1, x2, y2), masks (bool, image-sized) and digit labels (0..9)."""
    height, width = photo.shape[:2]
    crop = min(height, width, image_size * 2)
    top, left = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
    canvas = Image.fromarray(photo[top : top + crop, left : left + crop]).resize((image_size, image_size))
    canvas = np.asarray(canvas, dtype=np.float32) / 255.0
    boxes, masks, labels = [], [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        size = int(rng.integers(image_size // 8, image_size // 3))
        x, y = rng.integers(0, image_size - size), rng.integers(0, image_size - size)
        candidate = (x, y, x + size, y + size)
        if any(_overlap(candidate, other) > 0.3 for other in boxes):
            continue
        index = rng.integers(0, len(digit_images))
        glyph = Image.fromarray((digit_images[index] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        alpha = (np.asarray(glyph, dtype=np.float32) / 255.0)[..., None]
        ink = np.zeros(3) if canvas[y : y + size, x : x + size].mean() > 0.5 else np.ones(3)
        ink = ink * 0.8 + rng.uniform(0, 0.2, 3)
        region = canvas[y : y + size, x : x + size]
        canvas[y : y + size, x : x + size] = (1 - alpha) * region + alpha * ink
        # the box is the glyph's inked extent, not the pasted square; the mask its inked pixels
        inked = alpha[..., 0] > 0.25
        rows, cols = np.where(inked)
        boxes.append((x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1))
        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[y : y + size, x : x + size] = inked
        masks.append(mask)
        labels.append(int(digit_labels[index]))
    return (canvas * 255).astype(np.uint8), boxes, masks, labels


def _rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool mask: run lengths of alternating 0s and 1s, starting with
    0s, in column-major order."""
    flat = mask.flatten(order="F").astype(np.int8)
    starts = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], starts, [flat.size]]))
    counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": list(mask.shape), "counts": counts}


def _overlap(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_digits_coco(out: Path, num_train=600, num_val=150, image_size=256, max_objects=4, seed=0):
    """Write ``images/*.png``, ``train.json`` and ``val.json`` into a subdirectory of ``out`` named
    after the parameters; reuse that subdirectory if it is complete.

    The cache is keyed on every parameter (and the format version), so changing any of them
    generates a new set instead of silently reusing one made with other parameters.
    Returns ``(images_dir, train_json, val_json)``. Category ids 1..10 are the digits 0..9.
    """
    out = Path(out) / f"v{FORMAT_VERSION}_train{num_train}_val{num_val}_{image_size}px_max{max_objects}_seed{seed}"
    images_dir, train_json, val_json = out / "images", out / "train.json", out / "val.json"
    if train_json.exists() and val_json.exists():  # val.json is written last
        return images_dir, train_json, val_json
    images_dir.mkdir(parents=True, exist_ok=True)
    digit_images, digit_labels, photos = _load_sources()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digit_images))
    split = int(0.8 * len(order))
    categories = [{"id": d + 1, "name": str(d)} for d in range(10)]
    for name, count, samples, first_id in (("train", num_train, order[:split], 0), ("val", num_val, order[split:], num_train)):
        images, annotations = [], []
        for image_id in range(first_id, first_id + count):
            photo = photos[rng.integers(0, len(photos))]
            pixels, boxes, masks, labels = _paste_digits(
                rng, photo, digit_images[samples], digit_labels[samples], image_size, max_objects
            )
            file_name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(images_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            for (x1, y1, x2, y2), mask, label in zip(boxes, masks, labels):
                w, h = float(x2 - x1), float(y2 - y1)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": label + 1, "bbox": [float(x1), float(y1), w, h],
                                    "segmentation": _rle(mask), "area": w * h, "iscrowd": 0})
        path = train_json if name == "train" else val_json
        path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return images_dir, train_json, val_json


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/digits"))
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=150)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_digits_coco(args.out, args.num_train, args.num_val, args.image_size, seed=args.seed))

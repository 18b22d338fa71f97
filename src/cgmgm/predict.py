"""Segment your own photos: support image(s) with their masks -> a mask for every query photo.

    python -m cgmgm.predict --support cat1.jpg cat1.png --query photos/ --out /tmp/pred
    python -m cgmgm.predict --support a.jpg a.png --support b.jpg b.png --class-value 7 \\
        --query 'shots/*.jpg' --ckpt outputs/train/<run>/checkpoints/best.ckpt
    python -m cgmgm.predict --support s.jpg s.png --query q.jpg --bam-weights train_epoch_x.pth
    python -m cgmgm.predict --support s.jpg s.png --query q.jpg backbone=resnet50 \\
        backbone.weights=/path/resnet50.pth model.gmm.components=3   # training-free overrides

The model (one of three):

- ``--ckpt``: a stage-2 checkpoint of ``cgmgm.train``, read with
  :func:`cgmgm.config.load_checkpoint` and rebuilt from its hyper-parameters as ``cgmgm.eval``
  does (:func:`cgmgm.eval.build_module`), BAM's ensemble included when it has a base learner;
- ``--bam-weights``: BAM's trained final model, mapped by :mod:`cgmgm.bam_model`;
- neither: the training-free model (``model=training_free`` composed from ``conf/train.yaml``
  with the trailing Hydra overrides; the default backbone's ImageNet weights ship offline).

Support masks: PNG with 0/255 (object = 255), or class-index masks with ``--class-value V``
(object = V, 255 = ignore, anything else background). Queries: files, folders (every image
file in it; a ``.png`` sharing its name with a photo there is taken as that photo's mask and
left out, with a note) or quoted globs.

Every image goes through the evaluation protocol's test resize, exactly as a test episode's
(:meth:`cgmgm.data.protocols.Protocol.eval_transform`: BAM's longer side 473, or 641 for a
COCO model, on a zero-padded square), and the prediction is brought back to the query's
original size as the protocol scores it (:func:`cgmgm.metrics.restore_original`, then the
argmax of the two classes, :func:`cgmgm.metrics.decide`). For each query the output
directory (default ``outputs/predict/<time>_<pid>``, new per run; a directory that already
holds files is refused) gets ``<name>_mask.png`` (0/255, the query's size) and
``<name>_overlay.png`` (the query with the predicted object tinted), and ``predict.json``
records the run. One line per query is printed: the files written and the foreground
fraction.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cgmgm.constants import IGNORE_INDEX
from cgmgm.data.files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    has_suffix,
    natural_key,
    read_gray,
    read_header,
    read_image,
    read_label,
    size_mismatch,
    value_set,
)

__all__ = ["Support", "build_predictor", "expand_queries", "main", "predict", "read_support"]

OUT_ROOT = Path("outputs") / "predict"  # default output: OUT_ROOT/<time>_<pid>
_GLOB_CHARS = "*?["
_LABEL_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")  # single-channel class-index masks


class Support:
    """One support pair: ``image`` uint8 [H, W, 3] and ``label`` uint8 [H, W] (0 bg, 1 object,
    255 ignore), with the files they came from."""

    def __init__(self, image_path: Path, mask_path: Path, image: np.ndarray, label: np.ndarray):
        self.image_path, self.mask_path = image_path, mask_path
        self.image, self.label = image, label


# ---------------------------------------------------------------------------- inputs


def _mask_values(path: Path) -> np.ndarray:
    """A mask file -> uint8 [H, W] as stored: class indices of a single-channel PNG, gray
    values of a bilevel / gray+alpha image, or of an RGB image whose three channels agree."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except FileNotFoundError:
        raise DatasetError(f"mask file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot decode mask {path} ({e}): the file is corrupt") from e
    if mode in _LABEL_MODES:
        return read_label(path)
    if mode in ("1", "LA"):
        return read_gray(path)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    if (rgb == rgb[..., :1]).all():
        return rgb[..., 0].copy()
    raise DatasetError(
        f"mask {path} is a colour ({mode}) image whose channels differ; a mask must be 0/255 "
        "or hold class indices (single-channel PNG). Fix: save the object as 255 on 0"
    )


def read_support(image_path: str | Path, mask_path: str | Path, class_value: int | None) -> Support:
    """Read and check one support pair (see the module docstring for the mask values); an
    error names the file(s) and the fix."""
    image_path, mask_path = Path(image_path), Path(mask_path)
    h, w, orientation = read_header(image_path)
    image = read_image(image_path)  # [H, W, 3]
    mask = _mask_values(mask_path)  # [H', W']
    if mask.shape != (h, w):
        raise DatasetError(
            size_mismatch(str(mask_path), mask.shape, image_path, (h, w), orientation)
        )
    present = set(np.unique(mask).tolist())
    if class_value is None:
        if not present <= {0, IGNORE_INDEX}:
            others = ", ".join(str(v) for v in sorted(present - {0, IGNORE_INDEX})[:8])
            raise DatasetError(
                f"support mask {mask_path} has values {value_set(mask)}, not 0/255 (object = "
                f"255): for a class-index mask pass the object's value as --class-value V, V "
                f"one of {others}"
            )
        label = (mask == IGNORE_INDEX).astype(np.uint8)  # [H, W]
        what = "pixel of value 255"
    else:
        if class_value not in present:
            raise DatasetError(
                f"support mask {mask_path} has values {value_set(mask)}, none equal to "
                f"--class-value {class_value}: pass the value its object has (or no "
                "--class-value for a 0/255 mask)"
            )
        label = (mask == class_value).astype(np.uint8)  # [H, W]
        if class_value != IGNORE_INDEX:
            label[mask == IGNORE_INDEX] = IGNORE_INDEX
        what = f"pixel of --class-value {class_value}"
    if not (label == 1).any():
        raise DatasetError(
            f"support mask {mask_path} has no foreground (no {what}): a support must show the "
            "object; draw its mask, or leave this pair out"
        )
    return Support(image_path, mask_path, image, label)


def expand_queries(specs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Query files from files, folders and globs, in order (folders and globs sorted
    naturally), each once; and notes on what a folder or glob held but was not taken."""
    out: list[Path] = []
    notes: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(
                (p for p in path.iterdir() if p.is_file()), key=lambda p: natural_key(p.name)
            )
            images = [p for p in files if has_suffix(p, IMAGE_EXTENSIONS)]
            photos = {p.stem for p in images if p.suffix.lower() != ".png"}
            masks = [p for p in images if p.suffix.lower() == ".png" and p.stem in photos]
            if masks:
                notes.append(
                    f"{path}: {len(masks)} .png file(s) share a name with a photo there (their "
                    f"masks, e.g. {masks[0].name}) and are not queries; name them with a glob "
                    "to segment them"
                )
            found = [p for p in images if p not in set(masks)]
            what = "folder"
        elif any(c in spec for c in _GLOB_CHARS):
            hits = sorted(glob.glob(os.path.expanduser(spec)), key=natural_key)
            found = [Path(p) for p in hits if Path(p).is_file() and has_suffix(p, IMAGE_EXTENSIONS)]
            skipped = [p for p in hits if Path(p) not in set(found)]
            if skipped:
                notes.append(
                    f"{spec}: {len(skipped)} match(es) are not image files, e.g. {skipped[0]}"
                )
            what = "glob"
        else:
            if not path.is_file():
                raise FileNotFoundError(f"--query {spec}: no such file or folder")
            found, what = [path], "file"
        if not found:
            raise FileNotFoundError(
                f"--query {spec}: the {what} matches no image file (suffixes "
                f"{', '.join(IMAGE_EXTENSIONS)}); check the path, and quote a glob "
                "(--query 'photos/*.jpg') so that the shell does not expand it"
            )
        out += [p for p in found if p not in set(out)]
    return out, notes


def _out_dir(out: str | None) -> Path:
    """The run's output folder, new or empty; an error if it holds files (never overwritten)."""
    if out is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f".{time.time_ns() // 1000 % 1_000_000:06d}"
        path = OUT_ROOT / f"{stamp}_{os.getpid()}"
    else:
        path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"--out {path} already holds files (or is a file): predictions never overwrite "
            "earlier ones; pass a new or empty folder, or leave --out out for a new one under "
            f"{OUT_ROOT}/"
        )
    return path


# ---------------------------------------------------------------------------- the model


def build_predictor(
    ckpt: str | None, bam_weights: str | None, overrides: Sequence[str], shot: int
) -> tuple[Any, Any, str, dict[str, Any]]:
    """``(module, transform, resize mode, record)``: the LitCGMGM to run (eval mode), the
    protocol's test resize its episodes go through, the protocol's resize kind ("pad" or
    "squash", for :func:`cgmgm.metrics.restore_original`) and a plain description."""
    from cgmgm.data.protocols import get_protocol

    if ckpt and bam_weights:
        raise ValueError("pass --ckpt or --bam-weights, not both")
    if ckpt:
        from omegaconf import OmegaConf

        from cgmgm.config import load_checkpoint
        from cgmgm.eval import build_module

        if overrides:
            raise ValueError(
                f"with --ckpt the model, backbone and protocol come from the checkpoint {ckpt}; "
                f"drop the overrides {list(overrides)}"
            )
        loaded = load_checkpoint(ckpt, key="--ckpt")
        hp = loaded["hyper_parameters"]
        trained = int(hp.get("shot", 1))
        if hp.get("base_learner_classes") and shot != trained:
            raise ValueError(
                f"--ckpt {ckpt} was trained for {trained}-shot episodes with BAM's ensemble, "
                f"whose K-shot reweighting is built for {trained} supports: give {trained} "
                f"--support pair(s), not {shot}"
            )
        protocol = str(hp.get("protocol") or "bam")
        cfg = OmegaConf.create({"ckpt_path": str(ckpt), "shot": None, "protocol": protocol})
        module = build_module(cfg, list(hp["class_ids"]), hp.get("class_names"), loaded)
        dataset = (hp.get("meta") or {}).get("dataset")
        record = {"model": "checkpoint", "ckpt": str(Path(ckpt).resolve())}
    elif bam_weights:
        from cgmgm.bam_model import load_bam_model

        module, info = load_bam_model(bam_weights, shot=shot, overrides=overrides)
        protocol, dataset = info["protocol"], info["dataset"]
        record = {"model": "bam", "bam_weights": str(Path(bam_weights).resolve()), **info}
    else:
        from cgmgm.config import compose, to_plain
        from cgmgm.lit import LitCGMGM

        cfg = compose("train", ["model=training_free", *overrides])
        if not cfg.model.training_free:
            raise ValueError(
                "without --ckpt or --bam-weights the model must be training-free (its meta "
                "learner would be untrained); drop the model= / model.training_free= override"
            )
        protocol, dataset = str(cfg.protocol), str(cfg.dataset.get("dataset", ""))
        module = LitCGMGM(
            model=to_plain(cfg.model),
            backbone=to_plain(cfg.backbone),
            class_ids=[1],
            seed=int(cfg.seed),
            protocol=protocol,
        )
        record = {"model": "training_free", "overrides": list(overrides)}
    p = get_protocol(protocol)
    transform = p.eval_transform(dataset or "default")
    record.update(
        backbone=module.hparams.backbone["name"],
        model_config=module.hparams.model,
        ensemble=module.model.has_ensemble,
        protocol=p.name,
        test_resize=getattr(transform, "cache_key", type(transform).__name__),
    )
    return module.eval(), transform, p.resize, record


def episode_tensors(
    image: np.ndarray, label: np.ndarray, transform: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image as a test episode holds it: (image [3, S, S] float in [0, 1], label [S, S]
    long {0, 1, 255}, valid [S, S] float, 1 on the image's own pixels) after ``transform``."""
    from cgmgm.data.episodes import _to_tensors

    img, lab, *rest = transform(image, label)
    img_t, lab_t = _to_tensors(img, lab)
    valid = torch.ones(lab_t.shape) if not rest else torch.from_numpy(rest[0] != 0).float()
    return img_t, lab_t, valid


@torch.no_grad()
def predict(
    module: Any,
    supports: Sequence[Support],
    queries: Sequence[Path],
    transform: Any,
    mode: str,
    device: str = "cpu",
) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """``[(query, image uint8 [H, W, 3], prediction uint8 [H, W] {0, 1})]``, one per query.

    The supports' backbone features are computed once; each query then runs the rest of
    :meth:`CGMGM.forward` (:meth:`CGMGM.from_features`, the same computation), and its logits
    are restored to the query's size as the protocol scores them (``mode``)."""
    from cgmgm.metrics import decide, restore_original

    model = module.model.to(device).eval()
    shots = [episode_tensors(s.image, s.label, transform) for s in supports]
    for s, (_, lab, _) in zip(supports, shots, strict=True):
        if not (lab == 1).any():
            print(
                f"warning: support mask {s.mask_path}: the object is too small to survive the "
                "test resize; this shot gives no foreground",
                file=sys.stderr,
            )
    support_imgs = torch.stack([x[0] for x in shots])[None].to(device)  # [1, K, 3, S, S]
    support_masks = torch.stack([x[1] for x in shots])[None].to(device)  # [1, K, S, S]
    support = model.backbone(support_imgs.flatten(0, 1))  # ([K, Cm, h, w], [K, Ch, h, w])
    results = []
    for path in queries:
        image = read_image(path)  # [H, W, 3]
        h, w = image.shape[:2]
        img, _, valid = episode_tensors(image, np.zeros((h, w), np.uint8), transform)
        query_img = img[None].to(device)  # [1, 3, S, S]
        query = model.backbone(query_img)  # ([1, Cm, h', w'], [1, Ch, h', w'])
        out = model.from_features(
            query, support, support_masks, valid[None].to(device), tuple(query_img.shape[-2:])
        )
        logits = restore_original(out["logits"].float(), torch.tensor([[h, w]]), (h, w), mode)
        pred = decide(logits)[0].cpu().numpy().astype(np.uint8)  # [H, W]
        results.append((path, image, pred))
    return results


def _names(queries: Sequence[Path]) -> list[str]:
    """A distinct output name per query: its stem, then ``<stem>-2``, ... for repeats."""
    seen: dict[str, int] = {}
    names = []
    for q in queries:
        k = seen.get(q.stem, 0) + 1
        seen[q.stem] = k
        names.append(q.stem if k == 1 else f"{q.stem}-{k}")
    return names


def write_outputs(
    out: Path, results: Sequence[tuple[Path, np.ndarray, np.ndarray]]
) -> list[dict[str, Any]]:
    """Write each query's mask (0/255) and overlay PNG into ``out``; print one line per query;
    return their records."""
    from cgmgm.figures import _PRED, _overlay

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name, (path, image, pred) in zip(_names([r[0] for r in results]), results, strict=True):
        mask_path, overlay_path = out / f"{name}_mask.png", out / f"{name}_overlay.png"
        Image.fromarray(pred * np.uint8(255), mode="L").save(mask_path)
        tinted = _overlay(image / 255.0, torch.from_numpy(pred), _PRED)  # [H, W, 3] in [0, 1]
        Image.fromarray(np.round(tinted * 255).astype(np.uint8)).save(overlay_path)
        fraction = float(pred.mean())
        print(f"{path}: {mask_path} ({overlay_path.name}), foreground {100 * fraction:.1f}%")
        records.append(
            {
                "query": str(path),
                "size_hw": list(pred.shape),
                "mask": str(mask_path),
                "overlay": str(overlay_path),
                "foreground_fraction": fraction,
            }
        )
    return records


# ---------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cgmgm.predict",
        description="Segment query photos given support photos with masks (few-shot).",
    )
    parser.add_argument(
        "--support", nargs=2, action="append", required=True, metavar=("IMAGE", "MASK"),
        help="a support photo and its mask (repeat for K shots)",
    )  # fmt: skip
    parser.add_argument(
        "--class-value", type=int, default=None,
        help="the object's value in class-index masks (default: 0/255 masks, object = 255)",
    )  # fmt: skip
    parser.add_argument(
        "--query", nargs="+", action="extend", required=True,
        help="query photos: files, folders or quoted globs",
    )  # fmt: skip
    parser.add_argument("--ckpt", help="a stage-2 checkpoint of cgmgm.train (.ckpt)")
    parser.add_argument("--bam-weights", help="BAM's trained final model (.pth)")
    parser.add_argument("--out", help="output folder (default: outputs/predict/<time>_<pid>)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument(
        "overrides", nargs="*",
        help="Hydra overrides of the training-free or BAM model, e.g. backbone=resnet50",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.class_value is not None and not 0 <= args.class_value <= 255:
        parser.error(f"--class-value must be 0..255, got {args.class_value}")
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line (see the module docstring); returns what predict.json holds."""
    from cgmgm.config import write_metrics

    args = parse_args(argv)
    supports = [read_support(i, m, args.class_value) for i, m in args.support]
    queries, notes = expand_queries(args.query)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for q in queries:
        read_header(q)  # every query readable before any work (an error names the file)
    out = _out_dir(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    module, transform, mode, record = build_predictor(
        args.ckpt, args.bam_weights, args.overrides, len(supports)
    )
    results = predict(module, supports, queries, transform, mode, device)
    record.update(
        supports=[[str(s.image_path), str(s.mask_path)] for s in supports],
        class_value=args.class_value,
        device=device,
        queries=write_outputs(out, results),
    )
    path = write_metrics(out / "predict.json", record)
    print(f"{len(results)} quer{'y' if len(results) == 1 else 'ies'} segmented; record: {path}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success; 2 with a one-line error for bad input."""
    try:
        run(argv)
    except (DatasetError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"python -m cgmgm.predict: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

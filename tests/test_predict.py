"""``python -m cgmgm.predict``: user photos in, masks and overlays out, with a training-free
model, a cgmgm checkpoint and BAM's trained final model (a fixture in BAM's exact key layout).

Images are small random scenes with a square object; models run with random weights where
real ones are not needed (the outputs' geometry and the model's arithmetic are what is tested).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cgmgm.config import compose, to_plain
from cgmgm.data.transforms import PadResize
from cgmgm.lit import LitCGMGM
from cgmgm.predict import main

FAST = ["backbone.weights=none", "model.gmm.iters=2", "model.gmm.components=2"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini-dev"


def _scene(path: Path, h: int, w: int, seed: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A noisy photo with a red square (rows y0:y1, cols x0:x1) written to ``path``; returns
    the object's 0/1 mask [H, W]."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = (220, 30, 30)
    Image.fromarray(img).save(path)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _support(tmp: Path, name: str, h: int, w: int, seed: int, values=(0, 255)) -> list[str]:
    """[image, mask] of a support pair, the mask holding ``values`` (bg, object)."""
    m = _scene(tmp / f"{name}.jpg", h, w, seed, (h // 4, 3 * h // 4, w // 4, 3 * w // 4))
    Image.fromarray(np.where(m == 1, values[1], values[0]).astype(np.uint8)).save(
        tmp / f"{name}.png"
    )
    return [str(tmp / f"{name}.jpg"), str(tmp / f"{name}.png")]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Supports s1 (80x64) and s2 (72x100); queries of other sizes in q/ (a folder also
    holding the masks of two of them) and in g/."""
    tmp = tmp_path_factory.mktemp("photos")
    _support(tmp, "s1", 80, 64, 1)
    _support(tmp, "s2", 72, 100, 2)
    (tmp / "q").mkdir()
    (tmp / "g").mkdir()
    for name, (h, w) in {"a": (64, 112), "b": (120, 70)}.items():
        m = _scene(tmp / "q" / f"{name}.jpg", h, w, 10 + h, (10, 40, 20, 50))
        Image.fromarray(m * 255).save(tmp / "q" / f"{name}.png")  # its mask: not a query
    for name, (h, w) in {"c": (90, 90), "d": (66, 101)}.items():
        _scene(tmp / "g" / f"{name}.jpg", h, w, 20 + w, (5, 30, 5, 30))
    (tmp / "g" / "notes.txt").write_text("not an image")
    return tmp


def _check_outputs(out: Path, expected: dict[str, tuple[int, int]]) -> dict:
    record = json.loads((out / "predict.json").read_text())
    assert [Path(q["query"]).stem for q in record["queries"]] == list(expected)
    for name, hw in expected.items():
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == hw and set(np.unique(mask).tolist()) <= {0, 255}
        overlay = Image.open(out / f"{name}_overlay.png")
        assert overlay.size == (hw[1], hw[0]) and overlay.mode == "RGB"
    return record


# ----------------------------------------------------------------------------- training-free


def test_training_free_two_shots_folder_and_glob(scenes, tmp_path, capsys):
    out = tmp_path / "out"
    s1, s2 = _support(scenes, "s1", 80, 64, 1), _support(scenes, "s2", 72, 100, 2)
    code, stdout, stderr = _run(
        capsys,
        "--support", *s1, "--support", *s2,
        "--query", scenes / "q", f"{scenes}/g/*",
        "--out", out, "--device", "cpu", *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    record = _check_outputs(out, {"a": (64, 112), "b": (120, 70), "c": (90, 90), "d": (66, 101)})
    assert record["model"] == "training_free" and len(record["supports"]) == 2
    assert record["test_resize"].startswith("PadResize(size=473")
    assert "2 .png file(s) share a name with a photo" in stderr and "notes.txt" in stderr
    lines = [ln for ln in stdout.splitlines() if "foreground" in ln]
    assert len(lines) == 4
    for line, q in zip(lines, record["queries"], strict=True):
        mask = np.asarray(Image.open(q["mask"]))
        assert line.startswith(q["query"]) and q["mask"] in line
        shown = float(re.search(r"foreground ([\d.]+)%", line)[1])
        assert shown == pytest.approx(100 * (mask == 255).mean(), abs=0.05)


def test_class_index_masks_with_class_value(scenes, tmp_path, capsys):
    s = _support(tmp_path, "ci", 70, 90, 3, values=(3, 7))
    code, _, err = _run(capsys, "--support", *s, "--query", scenes / "g" / "c.jpg", *FAST)
    assert (
        code == 2
        and "ci.png" in err
        and "{3, 7}" in err
        and "--class-value V, V one of 3, 7" in err
    )
    out = tmp_path / "o"
    code, _, err = _run(
        capsys, "--support", *s, "--class-value", "7", "--query", scenes / "g" / "c.jpg",
        "--out", out, *FAST,
    )  # fmt: skip
    assert code == 0, err
    assert _check_outputs(out, {"c": (90, 90)})["class_value"] == 7
    code, _, err = _run(capsys, "--support", *s, "--class-value", "5", "--query", s[0], *FAST)
    assert code == 2 and "ci.png" in err and "none equal to --class-value 5" in err


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_file(scenes, tmp_path, capsys):
    good = _support(tmp_path, "good", 64, 64, 4)
    q = str(scenes / "g" / "c.jpg")
    # a mask of another size than its image
    _scene(tmp_path / "big.jpg", 64, 80, 5, (1, 9, 1, 9))
    Image.fromarray(np.full((60, 80), 255, np.uint8)).save(tmp_path / "small.png")
    code, _, err = _run(
        capsys, "--support", tmp_path / "big.jpg", tmp_path / "small.png", "--query", q
    )
    assert code == 2 and all(s in err for s in ("small.png is 60x80", "big.jpg is 64x80"))
    # no foreground
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "empty.png")
    code, _, err = _run(capsys, "--support", good[0], tmp_path / "empty.png", "--query", q)
    assert code == 2 and "empty.png has no foreground" in err
    # queries that match nothing
    (tmp_path / "nothing").mkdir()
    for spec in (f"{tmp_path}/*.webp", str(tmp_path / "nothing"), str(tmp_path / "gone.jpg")):
        code, _, err = _run(capsys, "--support", *good, "--query", spec)
        assert code == 2 and spec in err, err
    # an unreadable image, as query and as support
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, _, err = _run(capsys, "--support", *good, "--query", tmp_path / "broken.jpg")
    assert code == 2 and "cannot decode image" in err and "broken.jpg" in err
    code, _, err = _run(capsys, "--support", tmp_path / "broken.jpg", good[1], "--query", q)
    assert code == 2 and "broken.jpg" in err
    # an output folder that already holds files is never written into
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x_mask.png").write_bytes(b"earlier")
    code, _, err = _run(capsys, "--support", *good, "--query", q, "--out", tmp_path / "used")
    assert code == 2 and "used already holds files" in err
    assert (tmp_path / "used" / "x_mask.png").read_bytes() == b"earlier"


# ----------------------------------------------------------------------------- checkpoint


def _reference_mask(module, supports, query: str, size: int = 473) -> np.ndarray:
    """The prediction computed apart from cgmgm.predict: BAM's test resize of every image, the
    module's forward on the episode, logits upsampled (align_corners) to the original's longer
    side squared, cropped to the original, argmax."""
    resize = PadResize(size)

    def load(img_path, mask=None):
        img = np.asarray(Image.open(img_path).convert("RGB"))
        lab = np.zeros(img.shape[:2], np.uint8) if mask is None else mask
        i, m, v = resize(img, lab)
        return torch.from_numpy(i).permute(2, 0, 1).float() / 255, torch.from_numpy(m), v, img

    shots = [load(i, (np.asarray(Image.open(m)) == 255).astype(np.uint8)) for i, m in supports]
    q_img, _, q_valid, orig = load(query)
    batch = {
        "query_img": q_img[None],
        "support_imgs": torch.stack([s[0] for s in shots])[None],
        "support_masks": torch.stack([s[1].long() for s in shots])[None],
        "query_valid": torch.from_numpy(q_valid).float()[None],
    }
    with torch.no_grad():
        logits = module.eval()(batch)["logits"]  # [1, 2, S, S]
    h, w = orig.shape[:2]
    up = F.interpolate(logits, size=(max(h, w),) * 2, mode="bilinear", align_corners=True)
    crop = up[0, :, :h, :w]
    return (crop[1] > crop[0]).numpy()


def test_checkpoint_prediction_equals_the_models_argmax(scenes, tmp_path, capsys):
    cfg = compose("train", ["model.proj_dim=16", "model.gmm.iters=2", "model.gmm.components=2"])
    torch.manual_seed(0)
    module = LitCGMGM(
        model=to_plain(cfg.model),
        backbone={"name": "efficientnet_lite0", "weights": None},
        class_ids=[1, 2],
        optim=to_plain(cfg.optim),
        base_learner_classes=4,
        shot=1,
        meta={"dataset": "synthetic", "fold": 0, "shot": 1},
    )
    with torch.no_grad():  # an ensemble that does something: not its [1, 0] start
        module.model.ensemble.gram_merge.weight.copy_(torch.tensor([1.3, 0.4]).view(1, 2, 1, 1))
        module.model.ensemble.cls_merge.weight.copy_(torch.tensor([0.8, 0.5]).view(1, 2, 1, 1))
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    support = _support(tmp_path, "sup", 80, 64, 6)
    queries = [scenes / "q" / "a.jpg", scenes / "q" / "b.jpg"]
    out = tmp_path / "out"
    code, _, err = _run(
        capsys, "--support", *support, "--query", *queries, "--ckpt", path, "--out", out
    )
    assert code == 0, err
    record = _check_outputs(out, {"a": (64, 112), "b": (120, 70)})
    assert record["model"] == "checkpoint" and record["ensemble"] is True
    for q in queries:
        expected = _reference_mask(module, [support], str(q))
        got = np.asarray(Image.open(out / f"{q.stem}_mask.png")) == 255
        assert 0 < expected.mean() < 1  # a mask with both classes: a meaningful comparison
        np.testing.assert_array_equal(got, expected)
    code, _, err = _run(
        capsys, "--support", *support, "--support", *support, "--query", queries[0], "--ckpt", path
    )
    assert code == 2 and "1-shot episodes with BAM's ensemble" in err
    code, _, err = _run(capsys, "--support", *support, "--query", queries[0], "--ckpt", path, "x=1")
    assert code == 2 and "drop the overrides" in err


# ----------------------------------------------------------------------------- BAM's weights


class AsppLike(nn.Module):
    """BAM's model/ASPP.py children: layer6_0 (global pooling branch), layer6_1 (1x1),
    layer6_2..4 (3x3 at rates 6, 12, 18), each (Conv2d with bias, ReLU)."""

    def __init__(self, c: int):
        super().__init__()
        self.layer6_0 = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())
        self.layer6_1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())
        for i, r in ((2, 6), (3, 12), (4, 18)):
            setattr(
                self,
                f"layer6_{i}",
                nn.Sequential(nn.Conv2d(c, c, 3, padding=r, dilation=r), nn.ReLU()),
            )


class BamFinalLike(nn.Module):
    """BAM's model/BAM.py OneModel as its state dict sees it (attribute names and order)."""

    def __init__(self, layers, fea_dim: int, high: int, classes: int, shot: int, dim: int = 256):
        super().__init__()
        from test_backbone_bam import PPMLike

        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = layers
        cls = nn.Sequential(
            nn.Conv2d(2 * high, 512, 3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(512, classes, 1),
        )
        self.learner_base = nn.Sequential(PPMLike(high, high // 4), cls)
        down = [nn.Conv2d(fea_dim, dim, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5)]
        self.down_query = nn.Sequential(*down)
        self.down_supp = nn.Sequential(nn.Conv2d(fea_dim, dim, 1, bias=False), *down[1:])
        self.init_merge = nn.Sequential(nn.Conv2d(2 * dim + 1, dim, 1, bias=False), nn.ReLU())
        self.ASPP_meta = AsppLike(dim)
        self.res1_meta = nn.Sequential(nn.Conv2d(5 * dim, dim, 1, bias=False), nn.ReLU())
        self.res2_meta = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.ReLU(),
        )
        self.cls_meta = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(dim, 2, 1),
        )
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        if shot > 1:
            self.kshot_rw = nn.Sequential(nn.Conv2d(shot, 2, 1), nn.ReLU(), nn.Conv2d(2, shot, 1))


def _expected_names(state: dict, vgg: bool, layer3: int) -> dict[str, torch.Tensor]:
    """Our LitCGMGM names for BAM's keys, by a table written here, with BAM's [layer3, layer2]
    input of down_query / down_supp put in our [layer2, layer3] order."""
    # BAM's layer0 = (conv, bn, relu) x 3, maxpool: its conv / bn indices -> timm's deep stem
    ours = ["conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1"]
    stem = dict(zip("013467", ours, strict=True))
    starts = [0, 7, 14, 24, 34]
    fixed = {
        "init_merge.0.weight": "meta.init_merge.0.weight",
        "res1_meta.0.weight": "meta.res1.0.weight",
        "res2_meta.0.weight": "meta.res2.0.weight",
        "res2_meta.2.weight": "meta.res2.2.weight",
        "cls_meta.0.weight": "meta.cls.0.weight",
        "cls_meta.3.weight": "meta.cls.3.weight",
        "cls_meta.3.bias": "meta.cls.3.bias",
        "gram_merge.weight": "ensemble.gram_merge.weight",
        "cls_merge.weight": "ensemble.cls_merge.weight",
    }
    aspp = {"layer6_0": "pool", "layer6_1": "branches.0", "layer6_2": "branches.1"}
    aspp |= {"layer6_3": "branches.2", "layer6_4": "branches.3"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("down_query", "down_supp"):
            name = f"meta.{key}"
            value = torch.cat([value[:, layer3:], value[:, :layer3]], 1)
        elif key in fixed:
            name = fixed[key]
        elif parts[0] == "ASPP_meta":
            name = f"meta.aspp.{aspp[parts[1]]}.{'.'.join(parts[2:])}"
        elif parts[0] == "kshot_rw":
            name = f"reweight.rw.{'.'.join(parts[1:])}"
        elif parts[0] == "learner_base":
            name = f"base_learner.{('ppm', 'cls')[int(parts[1])]}.{'.'.join(parts[2:])}"
        elif vgg:
            k = int(parts[0][-1])
            name = f"backbone.body.features.{starts[k] + int(parts[1])}.{'.'.join(parts[2:])}"
        elif parts[0] == "layer0":
            name = f"backbone.body.{stem[parts[1]]}.{'.'.join(parts[2:])}"
        else:
            name = f"backbone.body.{key}"
        out[f"model.{name}"] = value
    return out


def _bam_file(tmp: Path, vgg: bool, shot: int, classes: int) -> tuple[Path, dict]:
    from torchvision.models.vgg import cfgs, make_layers

    from test_backbone_bam import pspnet_resnet50_layers, randomise_batchnorm

    torch.manual_seed(3)
    if vgg:
        features = list(make_layers(cfgs["D"], batch_norm=True))
        layers = [
            nn.Sequential(*features[a:b])
            for a, b in ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))
        ]
        model = BamFinalLike(layers, 512 + 256, 512, classes, shot)
    else:
        model = BamFinalLike(pspnet_resnet50_layers(), 1024 + 512, 2048, classes, shot)
    randomise_batchnorm(model)
    with torch.no_grad():
        model.gram_merge.weight.uniform_(0.5, 1.5)
        model.cls_merge.weight.uniform_(-0.5, 1.5)
    state = model.state_dict()
    path = tmp / ("bam_vgg.pth" if vgg else "bam_resnet.pth")
    wrapped = {f"module.{k}": v for k, v in state.items()}  # saved from DataParallel
    torch.save({"epoch": 7, "state_dict": wrapped, "optimizer": {}}, path)
    return path, state


def test_bam_weights_load_key_by_key_and_predict(scenes, tmp_path, capsys):
    from cgmgm.bam_model import load_bam_model

    path, state = _bam_file(tmp_path, vgg=True, shot=2, classes=16)
    module, info = load_bam_model(path, shot=2)
    assert info["backbone"] == "vgg16" and info["shot"] == 2 and info["dataset"] == "pascal"
    assert module.hparams.model["guidance"] == ["cosine"] and module.model.has_ensemble
    expected = _expected_names(state, vgg=True, layer3=512)
    own = module.state_dict()
    assert set(expected) == set(own)
    for name, value in expected.items():
        assert torch.equal(own[name], value), name

    s1, s2 = _support(tmp_path, "b1", 64, 80, 8), _support(tmp_path, "b2", 90, 60, 9)
    out = tmp_path / "out"
    code, _, err = _run(
        capsys, "--support", *s1, "--support", *s2, "--query", scenes / "g" / "d.jpg",
        "--bam-weights", path, "--out", out, "protocol=hsnet",
    )  # fmt: skip
    assert code == 0, err
    record = _check_outputs(out, {"d": (66, 101)})
    assert record["model"] == "bam" and record["test_resize"] == "SquashResize(size=400)"
    code, _, err = _run(capsys, "--support", *s1, "--query", s2[0], "--bam-weights", path)
    assert code == 2 and "2-shot episodes" in err and "bam_vgg.pth" in err


def test_bam_resnet_layout_maps_every_key(tmp_path):
    from cgmgm.bam_model import load_bam_model

    path, state = _bam_file(tmp_path, vgg=False, shot=1, classes=61)
    module, info = load_bam_model(path, shot=1)
    assert (info["backbone"], info["dataset"], info["base_learner_classes"]) == (
        "resnet50_psp",
        "coco",
        61,
    )
    expected = _expected_names(state, vgg=False, layer3=1024)
    own = module.state_dict()
    assert set(expected) == set(own)
    for name, value in expected.items():
        assert torch.equal(own[name], value), name


def test_bam_weights_refuses_other_files(tmp_path):
    from cgmgm.bam_model import bam_model_info, map_bam_state

    z = torch.zeros
    final = {
        "layer0.0.weight": z(64, 3, 3, 3),
        "layer1.0.weight": z(64, 64, 3, 3),
        "down_query.0.weight": z(8, 12, 1, 1),
        "init_merge.0.weight": z(8, 17, 1, 1),
        "cls_meta.3.weight": z(2, 8, 1, 1),
        "learner_base.1.4.weight": z(16, 512, 1, 1),
    }
    with pytest.raises(ValueError, match=r"stage1\.pth.*stage-1 PSPNet.*base_ckpt="):
        stage1 = {"layer0.0.weight": z(1), "ppm.features.0.1.weight": z(1), "cls.4.weight": z(1)}
        bam_model_info(stage1, "stage1.pth")
    with pytest.raises(ValueError, match=r"x\.pth.*no down_query\.0\.weight"):
        bam_model_info({k: v for k, v in final.items() if k != "down_query.0.weight"}, "x.pth")
    with pytest.raises(ValueError, match=r"kshot_trans_dim=0"):
        bam_model_info({**final, "kshot_rw.weight": z(2, 2, 1, 1)}, "x.pth")
    with pytest.raises(ValueError, match=r"y\.pth.*1 key.*'aux_meta\.0\.weight'"):
        map_bam_state({**final, "aux_meta.0.weight": z(1)}, 4, 12, "y.pth")


def test_bam_weights_with_a_wrong_shape_name_the_key(tmp_path):
    from cgmgm.bam_model import load_bam_model

    path, state = _bam_file(tmp_path, vgg=True, shot=1, classes=16)
    saved = torch.load(path, weights_only=True)
    saved["state_dict"]["module.res1_meta.0.weight"] = torch.zeros(256, 1024, 1, 1)
    torch.save(saved, path)
    with pytest.raises(ValueError, match=r"bam_vgg\.pth.*model\.meta\.res1\.0\.weight: file"):
        load_bam_model(path, shot=1)


# ----------------------------------------------------------------------------- real photos


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not here")
def test_real_pair_from_coco_mini_dev(tmp_path, capsys):
    cat = DATA / "cat"
    out = tmp_path / "cat"
    code, _, err = _run(
        capsys, "--support", cat / "000000000650.jpg", cat / "000000000650.png",
        "--query", cat / "000000022892.jpg", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    pred = np.asarray(Image.open(out / "000000022892_mask.png")) == 255
    truth = np.asarray(Image.open(cat / "000000022892.png")) > 127
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert pred.shape == truth.shape and iou > 0.3  # the ImageNet backbone finds the cat

"""One episode batch, timed by stage, for CGMGM (ablation=cgmgm) against BAM (ablation=bam); and an
evaluation with the frozen-feature cache against one without it. All measured in one run.

Part 1 (stages): a batch of 8 one-shot episodes at 473 x 473 (BAM's PASCAL test size) through
the paper's full model and through BAM's cosine prior (``ablation=bam``), both BAM's meta
learner without a base learner, every other setting from conf/model/cgmgm.yaml. Stages are
timed with forward hooks on the modules (backbone, IMGR, CDGMG, QCPE, meta learner); "other" is
the rest of the forward (mask fractions, projections, prototype, upsampling). An episode is
timed cache cold (the backbone runs) and warm (its features come from
:class:`cgmgm.features.FeatureCache`).

Part 2 (evaluation): BAM's protocol shape, in small: ``--runs`` test runs (episode seeds) of
``--episodes`` episodes each over a pool of ``--images`` images, under BAM's test resize
(473, padded), scored at original size; the cache off (the backbone runs for every image of
every episode) against on (once per image), through ``Trainer.test``. The metrics of both
must be equal, and are checked.

    python benchmarks/bench_episode.py [--device cpu|cuda] [--repeats 3] [--episodes 24]

On CUDA the backbone runs under bf16 autocast with TF32 matmuls allowed; the EM stays fp32
(cgmgm.models.gmm upcasts). Last lines: ``episode_ratio_cgmgm_vs_bam: <x>`` (warm cache, the
ratio of whole episodes) and ``eval_speedup_cache: <x>``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time
import warnings
from collections import defaultdict

import lightning as L
import torch

from cgmgm.config import compose_model
from cgmgm.data import EpisodicDataModule
from cgmgm.data.transforms import PadResize
from cgmgm.lit import LitCGMGM

B, K, SIZE = 8, 1, 473
STAGES = ("backbone", "imgr", "cdgmg", "qcpe", "meta")


class StageTimer:
    """Wall time per named submodule, from forward pre/post hooks (synchronised on CUDA)."""

    def __init__(self, model: torch.nn.Module, sync) -> None:
        self.sync, self.times = sync, defaultdict(float)
        self._start: dict[str, float] = {}
        self.handles = []
        for name in STAGES:
            module = getattr(model, name, None)
            if module is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(*_):
            self.sync()
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(*_):
            self.sync()
            self.times[name] += time.perf_counter() - self._start.pop(name)

        return hook


def episode_batch(device: torch.device, seed: int = 0) -> dict:
    """B one-shot episodes at SIZE x SIZE: random images, a blob as the object, padding on the
    right quarter of each query (as BAM's test resize leaves it)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, 3, SIZE, SIZE, generator=g)
    s = torch.rand(B, K, 3, SIZE, SIZE, generator=g)
    masks = torch.zeros(B, K, SIZE, SIZE, dtype=torch.long)
    masks[..., SIZE // 4 : SIZE // 2, SIZE // 4 : SIZE // 2] = 1
    valid = torch.ones(B, SIZE, SIZE)
    valid[..., 3 * SIZE // 4 :] = 0
    keys = [[f"q{i}" for i in range(B)]] + [[f"s{i}_{j}" for i in range(B)] for j in range(K)]
    batch = {"query_img": q, "support_imgs": s, "support_masks": masks, "query_valid": valid}
    return {**{k: v.to(device) for k, v in batch.items()}, "image_keys": keys}


def time_episode(lit: LitCGMGM, batch: dict, warm: bool, repeats: int, sync, autocast):
    """(best wall time of one batch, its per-stage times) with a cold or warm cache."""
    timer = StageTimer(lit.model, sync)
    best, stages = float("inf"), {}
    for _ in range(repeats):
        if not warm:
            lit.use_feature_cache(0)  # no cache: every image through the backbone
        timer.times.clear()
        sync()
        t = time.perf_counter()
        with torch.no_grad(), autocast():
            lit(batch)
        sync()
        wall = time.perf_counter() - t
        if wall < best:
            best, stages = wall, dict(timer.times)
    for h in timer.handles:
        h.remove()
    stages["other"] = best - sum(stages.values())
    return best, stages


def part_stages(args, device, sync, autocast) -> dict[str, float]:
    batch = episode_batch(device)
    walls = {}
    for guidance in ("cgmgm", "bam"):
        model_cfg = compose_model([f"ablation={guidance}"])
        lit = LitCGMGM(model_cfg, {"name": "efficientnet_lite0", "weights": "imagenet"}, [1])
        lit.to(device).eval()
        cold, cold_stages = time_episode(lit, batch, False, args.repeats, sync, autocast)
        lit.use_feature_cache(2**34)
        lit.bind_feature_cache()
        with torch.no_grad(), autocast():
            lit(batch)  # fill the cache
        warm, warm_stages = time_episode(lit, batch, True, args.repeats, sync, autocast)
        walls[guidance] = (cold, warm)
        for label, wall, stages in (("cold", cold, cold_stages), ("warm", warm, warm_stages)):
            parts = "  ".join(f"{k} {v * 1e3:7.1f}" for k, v in stages.items() if v > 0)
            print(f"{guidance:6s} cache {label}: {wall * 1e3:8.1f} ms per batch of {B} | {parts}")
    return {
        "cold": walls["cgmgm"][0] / walls["bam"][0],
        "warm": walls["cgmgm"][1] / walls["bam"][1],
    }


def part_eval(args, device) -> float:
    """Seconds of the evaluation with the cache off / on (same metrics, checked)."""
    results, walls = {}, {}
    accel = "gpu" if device.type == "cuda" else "cpu"
    lit = None  # one model (same weights) for both
    for cache in (False, True):
        dm = EpisodicDataModule(
            "synthetic",
            {"image_size": 128, "num_images": {"val": args.images}},
            protocol="bam",
            classes="all",
            eval_split="val",
            test_episodes=args.episodes,
            eval_batch_size=B,
            eval_transform=PadResize(SIZE),
            original_size=128,
            cache=cache,
        )
        lit = lit or LitCGMGM(
            compose_model([]),
            {"name": "efficientnet_lite0", "weights": "imagenet"},
            dm.classes,
            protocol="bam",
        )
        lit.use_feature_cache(2**34 if cache else 0)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = L.Trainer(
                accelerator=accel,
                devices=1,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                default_root_dir=tmp,
                precision="bf16-mixed" if device.type == "cuda" else "32-true",
            )
            t = time.perf_counter()
            per_run = []
            for seed in range(args.runs):
                dm.set_test_seed(seed)
                per_run.append(trainer.test(lit, datamodule=dm, verbose=False)[0])
            walls[cache] = time.perf_counter() - t
        results[cache] = per_run
        stats = lit.feature_cache_stats()
        print(
            f"eval cache {'on ' if cache else 'off'}: {walls[cache]:7.1f} s for {args.runs} runs x "
            f"{args.episodes} episodes over {args.images} images"
            + (f" (backbone ran {stats['misses']} times)" if stats else "")
        )
    if results[False] != results[True]:
        raise SystemExit(f"metrics differ with the cache on: {results[True]} vs {results[False]}")
    print(f"metrics equal with the cache on and off (mIoU {results[True][0]['test/mIoU']:.2f})")
    return walls[False] / walls[True]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=5, help="test runs (episode seeds), as BAM's 5")
    ap.add_argument("--episodes", type=int, default=16, help="episodes per run")
    ap.add_argument("--images", type=int, default=40, help="images in the evaluated pool")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda else contextlib.nullcontext
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    threads = torch.get_num_threads()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {threads}")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|eval mode).*")
    ratio = part_stages(args, device, sync, autocast)
    speedup = part_eval(args, device)
    print(f"episode ratio gmm / cosine: cache cold {ratio['cold']:.2f}, warm {ratio['warm']:.2f}")
    print(f"episode_ratio_cgmgm_vs_bam: {ratio['warm']:.2f}")
    print(f"eval_speedup_cache: {speedup:.2f}")


if __name__ == "__main__":
    main()

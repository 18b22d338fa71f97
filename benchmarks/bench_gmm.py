"""Batched EM (cgmgm.models.gmm.fit_gmm) against scikit-learn's GaussianMixture, in one run.

Workload (the CDGMG step of a 1-shot batch at 473x473): 8 episodes, each 2 x 60 x 60 pixels
(support + query), D = 256, M = 3 diagonal Gaussians for fg and for bg: 16 mixtures. Both sides
start from the same initial parameters and run the same number of EM iterations with no early
stop; scikit-learn fits the 16 mixtures one by one on each class's pixels.

It also measures this machine's memory bandwidth and matrix-product throughput and prints our
time beside the floor: the bytes that must move (x read once per EM iteration) and the flops that
must run (the E-step and M-step products at the measured rate of a large square product).

    python benchmarks/bench_gmm.py [--iters 10] [--repeats 5] [--device cpu|cuda]

Last lines: ``em_vs_floor: <x>`` (our time over the floor), ``speedup_vs_sklearn: <x>``.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGMM

from cgmgm.models.gmm import _PAD, fit_gmm

B, PIX, D, M = 8, 2 * 60 * 60, 256, 3


def episodes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, D] (clustered features), weight [B, 2, N] (bg, fg; fg ~ 25% of the pixels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, 2, M, D, generator=g) * 2.0  # [B, class, M, D]
    fg = torch.zeros(B, PIX)
    for b in range(B):
        start = int(torch.randint(0, PIX // 2, (1,), generator=g))
        fg[b, start : start + PIX // 4] = 1.0
    comp = torch.randint(0, M, (B, PIX), generator=g)
    cls = fg.long()
    mean = centres[torch.arange(B)[:, None], cls, comp]  # [B, N, D]
    x = mean + torch.randn(B, PIX, D, generator=g) * torch.rand(B, 1, D, generator=g).add(0.5)
    return x.contiguous(), torch.stack([1 - fg, fg], 1)


def best_of(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def machine_rates(device: str, sync) -> tuple[float, float]:
    """(read bandwidth in bytes/s, fp32 matrix-product rate in flop/s) measured here."""
    big = torch.ones(256 * 2**20 // 4, device=device)  # 256 MiB
    bw = big.numel() * 4 / best_of(lambda: big.sum(), 5, sync)
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    flops = 2 * n**3 / best_of(lambda: a @ b, 5, sync)
    return bw, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {dev} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"workload: {B} episodes x {PIX} pixels, D={D}, M={M} diag, fg+bg, {args.iters} EM iters")

    x, w = episodes()
    init = fit_gmm(x, w, M, "diag", iters=0, grad=False)  # shared theta^0 (untimed)
    # our reg_covar is relative to each episode's spread: give scikit-learn the absolute value
    spread = [x[b].var(0).mean().item() for b in range(B)]

    def sklearn_fits() -> list[SkGMM]:
        out = []
        for b in range(B):
            for c in range(2):
                pts = x[b][w[b, c] > 0].numpy()
                wt = init.weights[b, c].double().numpy()
                sk = SkGMM(
                    M,
                    covariance_type="diag",
                    max_iter=args.iters,
                    tol=0.0,
                    reg_covar=1e-6 * spread[b],
                    weights_init=wt / wt.sum(),
                    means_init=init.means[b, c].numpy(),
                    precisions_init=1.0 / init.covariances[b, c].numpy(),
                )
                out.append(sk.fit(pts))
        return out

    xd, wd = x.to(dev), w.to(dev)
    init_d = type(init)(*(t.to(dev) for t in init))

    def ours():
        return fit_gmm(xd, wd, M, "diag", args.iters, init=init_d, grad=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk_fits = sklearn_fits()  # warm-up and the reference result
        t_sk = best_of(sklearn_fits, max(1, args.repeats // 2))
    ours()
    t_ours = best_of(ours, args.repeats, sync)

    res = ours()
    sk_means = torch.tensor(np.stack([f.means_ for f in sk_fits])).view(B, 2, M, D)
    err = (res.means.cpu().double() - sk_means).abs().max().item()
    print(f"max |mean difference| vs scikit-learn: {err:.2e}")

    bw, rate = machine_rates(args.device, sync)
    n_pts, k = B * PIX, 2 * M
    read_once = n_pts * D * 4  # x, float32
    if dev.type == "cpu":  # x read once per iteration, in chunks whose buffer stays in cache
        bytes_moved = args.iters * read_once
    else:  # one chunk: x read, [u, u^2] written (u = x - centre), u read, [u, u^2, 1, pad] read 2x
        bytes_moved = args.iters * n_pts * 4 * (4 * D + 2 * (2 * D + _PAD))
    floor_bytes = args.iters * read_once  # the least: x read once per iteration
    flops = args.iters * 2 * (2 * n_pts * 2 * D * k)  # E-step and M-step products
    t_floor = max(floor_bytes / bw, flops / rate)
    print(f"machine: read {bw / 1e9:.1f} GB/s, fp32 matmul {rate / 1e9:.0f} GFLOP/s")
    print(
        f"must move >= {floor_bytes / 1e6:.0f} MB, we stream {bytes_moved / 1e6:.0f} MB; "
        f"flops {flops / 1e9:.2f} G"
    )
    print(
        f"floor: {t_floor * 1e3:.1f} ms (bytes {floor_bytes / bw * 1e3:.1f} ms, "
        f"flops {flops / rate * 1e3:.1f} ms)"
    )
    print(f"scikit-learn: {t_sk * 1e3:.1f} ms for {2 * B} fits")
    print(f"cgmgm fit_gmm: {t_ours * 1e3:.1f} ms ({t_ours / t_floor:.1f}x the floor)")
    print(f"em_vs_floor: {t_ours / t_floor:.2f}")
    print(f"speedup_vs_sklearn: {t_sk / t_ours:.2f}")


if __name__ == "__main__":
    main()

"""Episode figures (paper Fig. 1 and 4): support / query / prediction overlays and the
cosine prior against the GMM posterior, as PNG files and through the logger's image API; and
each guidance map of the first episode as an image of its own (logger only, e.g. W&B)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from cgmgm.constants import IGNORE_INDEX
from cgmgm.models.resize import resize

__all__ = ["EpisodeFigures", "episode_figure", "guidance_images"]

_FG = np.array([0.1, 0.9, 0.2])  # ground-truth / support overlay colour
_PRED = np.array([1.0, 0.15, 0.1])  # prediction overlay colour
_TITLES = {
    "cosine_prior": "cosine prior",
    "initial_mask": "initial mask M_q",
    "posterior": "GMM posterior p(fg|x)",
}
_MAPS = ("cosine_prior", "posterior")  # the figure's map columns
_MAP_ALPHA = 0.55  # weight of the colour-mapped guidance over the grey query


def _rgb(img: Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] float."""
    return img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _overlay(img: np.ndarray, mask: Tensor, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``colour`` into ``img`` [H, W, 3] where mask [H, W] == 1."""
    m = (mask.detach().cpu().numpy() == 1)[..., None]
    return np.where(m, (1 - alpha) * img + alpha * colour, img)


def _upsample(m: Tensor, size: tuple[int, int]) -> np.ndarray:
    """[1, h, w] map -> [H, W] numpy, by the one resize the scores use."""
    return resize(m[None].float(), size)[0, 0].cpu().numpy()


def _fg_iou(pred: Tensor, target: Tensor) -> float:
    valid = target != IGNORE_INDEX
    p, t = (pred == 1) & valid, target == 1
    union = (p | t).sum().item()
    return 100.0 * (p & t).sum().item() / union if union else 0.0


def episode_figure(
    batch: Mapping[str, Any],
    outputs: Mapping[str, Tensor],
    num: int = 4,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """One row per episode: support (first shot) with its mask, query with the truth, query
    with the prediction, then the cosine prior and (when the posterior is computed) the posterior.

    batch: ``query_img`` [B, 3, H, W], ``query_mask`` [B, H, W], ``support_imgs``
    [B, K, 3, H, W], ``support_masks`` [B, K, H, W], ``class_id`` [B]; outputs: ``pred``
    [B, H, W] and maps [B, 1, h, w] (``cosine_prior``, optional ``posterior``).
    """
    n = min(num, batch["query_img"].shape[0])
    maps = [(k, _TITLES[k]) for k in _MAPS if k in outputs]
    cols = 3 + len(maps)
    fig = Figure(figsize=(2.2 * cols, 2.3 * n), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    for r in range(n):
        q = _rgb(batch["query_img"][r])
        size = tuple(q.shape[:2])
        target, pred = batch["query_mask"][r], outputs["pred"][r]
        cid = int(batch["class_id"][r])
        name = class_names[cid] if class_names is not None and cid < len(class_names) else cid
        k = batch["support_imgs"].shape[1]
        panels = [
            (
                _overlay(_rgb(batch["support_imgs"][r, 0]), batch["support_masks"][r, 0], _FG),
                f"support (1/{k}): {name}",
            ),
            (_overlay(q, target, _FG), "query + truth"),
            (_overlay(q, pred, _PRED), f"prediction, IoU {_fg_iou(pred, target):.0f}"),
        ]
        for c, (image, title) in enumerate(panels):
            axes[r, c].imshow(image)
            axes[r, c].set_title(title, fontsize=8)
        grey = q.mean(-1)
        for j, (key, title) in enumerate(maps):
            ax = axes[r, 3 + j]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            ax.imshow(
                _upsample(outputs[key][r], size), cmap="jet", vmin=0, vmax=1, alpha=_MAP_ALPHA
            )
            ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def guidance_images(
    batch: Mapping[str, Any], outputs: Mapping[str, Tensor], index: int = 0
) -> list[tuple[str, np.ndarray]]:
    """Each guidance map of episode ``index`` present in ``outputs`` (cosine prior, initial mask
    with IMG, posterior when computed), brought to the query's size and colour-mapped (jet,
    0..1) over the grey query, as the figure draws it: [(title, uint8 [H, W, 3])].

    batch: ``query_img`` [B, 3, H, W]; outputs: maps [B, 1, h, w]."""
    q = _rgb(batch["query_img"][index])  # [H, W, 3]
    size = tuple(q.shape[:2])
    grey = q.mean(-1, keepdims=True)  # [H, W, 1]
    jet = matplotlib.colormaps["jet"]
    out = []
    for key, title in _TITLES.items():
        if key not in outputs:
            continue
        m = np.clip(_upsample(outputs[key][index], size), 0.0, 1.0)  # [H, W]
        blend = (1 - _MAP_ALPHA) * grey + _MAP_ALPHA * jet(m)[..., :3]  # [H, W, 3]
        out.append((title, np.round(255 * blend).astype(np.uint8)))
    return out


class EpisodeFigures(L.Callback):
    """Draw :func:`episode_figure` for the first ``num_episodes`` val / test episodes.

    Files: ``dirpath/val_epoch<NNN>.png`` (every ``every_n_epochs`` epochs) and
    ``dirpath/test.png`` (``test_seed<S>.png`` when the datamodule has a ``test_seed``);
    ``dirpath`` defaults to ``<trainer.default_root_dir>/figures``. Each figure also goes to
    every logger with an image API (``log_image``, e.g. W&B) as ``{stage}/episodes``, and
    with it the first episode's guidance maps, one image each (:func:`guidance_images`,
    captioned with the map), as ``{stage}/guidance``. Rank 0 only.
    """

    def __init__(
        self, dirpath: str | None = None, num_episodes: int = 4, every_n_epochs: int = 1
    ) -> None:
        self.dirpath = dirpath
        self.num_episodes = int(num_episodes)
        self.every_n_epochs = int(every_n_epochs)
        self._batch: dict[str, list] = {}
        self._outputs: dict[str, list] = {}
        self.saved: list[Path] = []

    def _collect(self, trainer: L.Trainer, outputs: Any, batch: Mapping[str, Any]) -> None:
        have = sum(len(x) for x in self._batch.get("query_img", []))
        if (
            not trainer.is_global_zero
            or not isinstance(outputs, Mapping)
            or have >= self.num_episodes
        ):
            return
        take = self.num_episodes - have
        for key in ("query_img", "query_mask", "support_imgs", "support_masks", "class_id"):
            self._batch.setdefault(key, []).append(torch.as_tensor(batch[key])[:take].cpu())
        for key, value in outputs.items():
            if isinstance(value, Tensor):
                self._outputs.setdefault(key, []).append(value[:take].detach().cpu())

    def _flush(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, name: str):
        batch = {k: torch.cat(v) for k, v in self._batch.items()}
        outputs = {k: torch.cat(v) for k, v in self._outputs.items()}
        self._batch, self._outputs = {}, {}
        if not batch or "pred" not in outputs:
            return
        fig = episode_figure(
            batch, outputs, self.num_episodes, getattr(pl_module, "class_names", None)
        )
        root = Path(self.dirpath or Path(trainer.default_root_dir) / "figures")
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{name}.png"
        fig.savefig(path)
        self.saved.append(path)
        loggers = [lg for lg in trainer.loggers if callable(getattr(lg, "log_image", None))]
        maps = guidance_images(batch, outputs) if loggers else []
        for logger in loggers:
            logger.log_image(key=f"{stage}/episodes", images=[str(path)], step=trainer.global_step)
            if maps:
                logger.log_image(
                    key=f"{stage}/guidance",
                    images=[image for _, image in maps],
                    caption=[title for title, _ in maps],
                    step=trainer.global_step,
                )

    def _val_epoch_drawn(self, trainer: L.Trainer) -> bool:
        return (
            not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._val_epoch_drawn(trainer):
            self._collect(trainer, outputs, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._val_epoch_drawn(trainer) and trainer.is_global_zero:
            self._flush(trainer, pl_module, "val", f"val_epoch{trainer.current_epoch:03d}")
        self._batch, self._outputs = {}, {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(trainer, outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            seed = getattr(trainer.datamodule, "test_seed", None)
            self._flush(trainer, pl_module, "test", "test" if seed is None else f"test_seed{seed}")
        self._batch, self._outputs = {}, {}

"""Frozen-feature cache: the backbone runs once per image, not once per episode.

Every model of this family keeps its backbone frozen, so the backbone's output for an image under
a deterministic transform is a constant: BAM's test protocol (1000 episodes x 5 seeds) touches a
few hundred images ten thousand times. :class:`FeatureCache` keeps those outputs, keyed by

- the backbone: a fingerprint of its architecture, normalisation and every weight
  (:func:`backbone_fingerprint`), so a changed weight file never serves stale features;
- the numerics: device type and autocast dtype of the computation;
- the image: the episode's image key (:meth:`cgmgm.data.EpisodeDataset.image_key`), which names
  the deterministic transform and the source image (file path, size and modification time, or
  the generator and its parameters).

Entries live in memory under a byte budget (least recently used first out) and optionally on
disk (``directory``), where later runs and other processes find them. A cached output is the
same tensor the backbone returned, and the backbone computes image by image, so an image's
features never depend on the other images of its batch: results are identical with the cache
on and off (tests/test_features.py).

Features that depend on the mask are not cached: no reading needs them (the backbone sees the
image only).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ByteLRU", "FeatureCache", "backbone_fingerprint"]

Features = tuple[Tensor, Tensor]  # (mid [Cm, h, w], high [Ch, h, w]) of one image


class ByteLRU:
    """Values by key under a byte budget, least recently used out first; a value larger than
    the budget is not kept (budget 0: nothing is)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"a cache's byte budget must be >= 0, got {max_bytes}")
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        """The value of ``key`` (now the most recently used), or None."""
        entry = self._items.get(key)
        if entry is None:
            return None
        self._items.move_to_end(key)
        return entry[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        """Keep ``value`` (``size`` bytes), dropping the least recently used over budget."""
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, int(size))
        self.bytes += int(size)
        while self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old


def backbone_fingerprint(backbone: nn.Module) -> str:
    """sha1 of the backbone's architecture (its module tree, with strides and dilations), the
    torch version, its buffers and every weight (names, shapes, dtypes and bytes): equal for
    equal weights and code, different when any weight or layer differs (so a disk cache written
    by other code or another torch is never read)."""
    h = hashlib.sha1(f"{type(backbone).__qualname__}|{backbone!r}|{torch.__version__}".encode())
    tensors = dict(backbone.state_dict())
    tensors.update({f"buffer:{k}": v for k, v in backbone.named_buffers()})  # mean / std too
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()


def _numerics(device: torch.device) -> str:
    """Device type and autocast dtype of a backbone call on ``device`` (part of the key)."""
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return f"{kind}:autocast-{torch.get_autocast_dtype(kind)}"
    return f"{kind}:fp32"


class FeatureCache:
    """Backbone outputs by image key, in memory (LRU, ``max_bytes``) and optionally on disk.

    Args:
        backbone_id: :func:`backbone_fingerprint` of the backbone whose outputs are cached.
        max_bytes: memory budget; the least recently used entries leave first. An entry larger
            than the budget is not kept in memory.
        directory: optional on-disk store (``<directory>/<backbone_id[:16]>/<key[:2]>/<key>.pt``),
            written atomically; None: memory only.

    ``hits``, ``disk_hits`` and ``misses`` count images served from memory, from disk and
    computed.
    """

    def __init__(
        self, backbone_id: str, max_bytes: int, directory: str | os.PathLike | None = None
    ) -> None:
        self.backbone_id = str(backbone_id)
        if directory is not None and str(directory) != "":
            directory = Path(directory).expanduser() / self.backbone_id[:16]
        else:
            directory = None
        self.directory = directory
        self._memory = ByteLRU(max_bytes)
        self.hits = self.disk_hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    def stats(self) -> dict[str, int]:
        """Counts for reports: entries, bytes held, hits, disk hits and misses."""
        return {
            "entries": len(self._memory),
            "bytes": self._memory.bytes,
            "hits": self.hits,
            "disk_hits": self.disk_hits,
            "misses": self.misses,
        }

    def key(self, image_key: str, device: torch.device) -> str:
        """The entry's key: sha1 of (backbone, numerics, image key)."""
        text = f"{self.backbone_id}|{_numerics(device)}|{image_key}"
        return hashlib.sha1(text.encode()).hexdigest()

    # ------------------------------------------------------------------ storage

    def _remember(self, key: str, feats: Features) -> None:
        self._memory.put(key, feats, sum(t.numel() * t.element_size() for t in feats))

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.pt"

    def _read_disk(self, key: str, device: torch.device) -> Features | None:
        if self.directory is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data["mid"].to(device), data["high"].to(device)
        except Exception as err:  # noqa: BLE001 - a torn or foreign file: say which
            raise RuntimeError(
                f"feature cache file {path} cannot be read ({type(err).__name__}: {err}); "
                f"delete it (or the whole cache directory {self.directory}) and rerun"
            ) from err

    def _write_disk(self, key: str, feats: Features) -> None:
        if self.directory is None:
            return
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save({"mid": feats[0].cpu(), "high": feats[1].cpu()}, tmp)
            os.replace(tmp, path)  # atomic: readers see the whole file or none
        except OSError as err:  # a full or read-only disk: keep going in memory, say so once
            warnings.warn(
                f"feature cache: cannot write {path} ({err}); from now on only in memory "
                f"(fix or drop cache.dir={self.directory.parent})",
                stacklevel=2,
            )
            self.directory = None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def lookup(self, key: str, device: torch.device) -> Features | None:
        """The entry for ``key`` from memory, else from disk (then kept in memory), else None."""
        feats = self._memory.get(key)
        if feats is not None:
            self.hits += 1
            return feats
        feats = self._read_disk(key, device)
        if feats is not None:
            self.disk_hits += 1
            self._remember(key, feats)
        return feats

    # ------------------------------------------------------------------ the one entry point

    def features(
        self, backbone: nn.Module, images: Tensor | None, image_keys: Sequence[str]
    ) -> Features:
        """Backbone outputs of N images: (mid [N, Cm, h, w], high [N, Ch, h, w]).

        images [N, 3, H, W] (row i has key ``image_keys[i]``) may be None when every key is
        cached; the images not found run through ``backbone`` in one batch (each distinct key
        once) and are stored.
        """
        device = images.device if images is not None else next(backbone.buffers()).device
        if images is not None and images.shape[0] != len(image_keys):
            raise ValueError(f"{images.shape[0]} images for {len(image_keys)} image keys")
        keys = [self.key(k, device) for k in image_keys]
        found: dict[str, Features] = {}
        missing: dict[str, int] = {}  # key -> first row holding it
        for row, key in enumerate(keys):
            if key in found or key in missing:
                continue
            feats = self.lookup(key, device)
            if feats is None:
                missing[key] = row
            else:
                found[key] = feats
        if missing:
            if images is None:
                raise RuntimeError(
                    f"{len(missing)} image(s) are not in the feature cache and the batch holds "
                    "no images to compute them from"
                )
            rows = list(missing.values())
            mid, high = backbone(images[rows])  # [M, Cm, h, w], [M, Ch, h, w]
            self.misses += len(rows)
            for j, key in enumerate(missing):
                feats = (mid[j].clone(), high[j].clone())  # own storage: the batch may go
                found[key] = feats
                self._remember(key, feats)
                self._write_disk(key, feats)
        mid = torch.stack([found[k][0] for k in keys]).to(device)  # [N, Cm, h, w]
        high = torch.stack([found[k][1] for k in keys]).to(device)  # [N, Ch, h, w]
        return mid, high

    def episode_features(
        self,
        backbone: nn.Module,
        query_img: Tensor,
        support_imgs: Tensor,
        image_keys: Sequence[Sequence[str]],
    ) -> tuple[Features, Features]:
        """:meth:`features` of an episode batch: query_img [B, 3, H, W], support_imgs
        [B, K, 3, H, W] and its ``image_keys`` (K + 1 sequences of B keys, query first, as a
        DataLoader collates episodes) -> (query (mid [B, Cm, h, w], high [B, Ch, h, w]),
        support (mid [B*K, Cm, h, w], high [B*K, Ch, h, w]) in ``support_imgs.flatten(0, 1)``
        order)."""
        b, k = support_imgs.shape[:2]
        if len(image_keys) != k + 1 or any(len(col) != b for col in image_keys):
            raise ValueError(
                f"image_keys must be K + 1 = {k + 1} sequences of B = {b} keys (a DataLoader "
                "batch of episodes); batch single episodes with torch.utils.data.default_collate"
            )
        rows = list(image_keys[0]) + [image_keys[1 + j][i] for i in range(b) for j in range(k)]
        images = torch.cat([query_img, support_imgs.flatten(0, 1)])  # [B + B*K, 3, H, W]
        mid, high = self.features(backbone, images, rows)
        return (mid[:b], high[:b]), (mid[b:], high[b:])

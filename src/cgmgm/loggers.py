"""Logger factories: a Weights & Biases logger that never prompts or blocks, and job cleanup."""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["finish_loggers", "wandb_api_key_configured", "wandb_logger", "wandb_mode"]

WANDB_MODES = ("online", "offline", "disabled")


def wandb_api_key_configured() -> bool:
    """True if ``WANDB_API_KEY`` is set or ~/.netrc (or ``$NETRC``) holds the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str | None = None) -> str:
    """The W&B mode to run in: ``mode`` if given, else ``$WANDB_MODE``, else ``online`` when an
    API key is configured and ``offline`` otherwise. ``online`` without a key would prompt for
    one, so it falls back to ``offline`` with a warning."""
    mode = mode or os.environ.get("WANDB_MODE") or None
    if mode == "dryrun":
        mode = "offline"
    if mode is None:
        mode = "online" if wandb_api_key_configured() else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "online" and not wandb_api_key_configured():
        warnings.warn(
            "wandb: no API key (WANDB_API_KEY or `wandb login`); logging offline instead "
            "(upload later with `wandb sync`)",
            stacklevel=2,
        )
        mode = "offline"
    return mode


def wandb_logger(
    mode: str | None = None,
    save_dir: str = ".",
    tags: list[str] | None = None,
    init_timeout: float = 60.0,
    **kwargs: Any,
) -> Any:
    """A Lightning ``WandbLogger`` in :func:`wandb_mode` ``mode``, with a bounded start-up.

    ``kwargs`` go to ``WandbLogger`` (project, entity, name, group, log_model, ...) and on to
    ``wandb.init``. Run files go to ``save_dir/wandb``.
    """
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode != "online":
        kwargs["log_model"] = False  # nothing can be uploaded
    settings = wandb.Settings(init_timeout=init_timeout, silent=True)
    logger = WandbLogger(
        save_dir=save_dir, mode=mode, tags=tags or None, settings=settings, **kwargs
    )
    init = getattr(logger, "_wandb_init", {})
    if init.get("anonymous") is None:  # wandb >= 0.19 warns on any value of this retired option
        init.pop("anonymous", None)
    return logger


def finish_loggers(failed: bool = False) -> None:
    """End this job's W&B run, if one is active (call at the end of every job, so that
    multirun jobs each get their own run)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)

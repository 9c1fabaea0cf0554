"""What a run writes for people: metrics.jsonl, loss curves and sample grids as PNG, train.log, and what
goes to the trackers (``train.report_to``: TensorBoard by default, wandb, none) through accelerate."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import torch


class MetricsLog:
    """Appends one JSON object per line; ``read`` gives them back (plots, reports, tests)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (and a final evaluation's, which came after
        the last checkpoint) so the file reads as one run."""
        if self.enabled and self.path.exists():
            keep = [r for r in self.read() if r.get("step", 0) <= step and not r.get("final")]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # blank, or the half line of a process killed while writing it
                pass
        return rows


def plot_losses(records: list[dict], out: str | Path, title: str = "") -> Path:
    """Text loss, flow loss and learning rate against step (validation points where present)."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    train = [r for r in records if "loss_lm" in r]
    val = [r for r in records if "val_flow" in r]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for ax, key, label in ((axes[0], "loss_lm", "text loss (nats/token)"), (axes[1], "loss_flow", "flow loss (MSE)")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1, label="train")
        ax.set_title(label)
        ax.set_xlabel("step")
        if any(r[key] > 0 for r in train):  # a Chameleon run has no flow loss (all 0)
            ax.set_yscale("log")
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_flow"] for r in val], "o-", label="val (fixed t grid)")
        if "val_lm" in val[0]:
            axes[0].plot([r["step"] for r in val], [r["val_lm"] for r in val], "o-", label="val")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return Path(out)


def save_grid(images: torch.Tensor, captions: list[str], out: str | Path, ncol: int = 8,
              marks: list[float] | None = None) -> Path:
    """(N, 3, H, W) in [0, 1] -> one PNG, each image with its prompt (and score) underneath."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    n = images.shape[0]
    ncol = min(ncol, n)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(1.9 * ncol, 2.45 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(images[i].clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        label = "\n".join(textwrap.wrap(captions[i], 24)[:3])
        if marks is not None:
            label += f"\n[{marks[i]:.2f}]"
        ax.set_title(label, fontsize=6.5, y=-0.02, va="top")
    fig.tight_layout(h_pad=0.4, w_pad=0.2)
    fig.savefig(out, dpi=110)
    return Path(out)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """(3, H, W) in [0, 1] -> an 8-bit PNG, written to a temp name and renamed (never half a file)."""
    from PIL import Image as PILImage

    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    PILImage.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")).save(tmp)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Trackers (accelerate's: TensorBoard, wandb) and the plain-text log
# --------------------------------------------------------------------------------------------------
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "none": None}


def tracker_names(report_to: str) -> list[str]:
    """accelerate's ``log_with`` for ``train.report_to``; a tracker whose package is missing stops the run
    here, in one line, before anything is built (wandb is never required)."""
    import importlib.util

    package = TRACKERS[report_to]
    if package is None:
        return []
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"train.report_to={report_to} but {package} is not installed: pip install {package} "
                         f"(or train.report_to=tensorboard|none)")
    return [report_to]


def hparams(config: dict, prefix: str = "") -> dict:
    """The config tree as flat ``section.key`` values TensorBoard's hparams accept (numbers, strings, bools)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # lists, None
            flat[name] = str(value)
    return flat


def log_image(trackers: list, tag: str, png: str | Path, step: int) -> None:
    """A PNG (the sample grid) to every tracker that takes images."""
    import numpy as np
    from PIL import Image as PILImage

    with PILImage.open(png) as im:
        array = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: array[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [array]}, step=step)


def log_line(record: dict) -> str:
    """One line of train.log for a metrics record: step, losses, lr, throughput."""
    keys = ("loss", "loss_lm", "loss_flow", "lr", "grad_norm", "tokens_per_s")
    return f"step {record['step']}: " + ", ".join(f"{k} {record[k]:.4g}" for k in keys if k in record)

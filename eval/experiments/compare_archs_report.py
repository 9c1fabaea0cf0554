"""The report of eval/experiments/compare_archs.py: the curves' plot, the runs' table and the markdown around the
headline figures (kept apart so the job reads top to bottom). ``image_key`` says which validation loss is a
setting's image loss; ``PAIR`` is the headline pair that every seed trains."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import md_table

if TYPE_CHECKING:
    from compare_archs import Run

PAIR = ("mot", "dense")  # the headline pair, trained with every seed in --seeds


def image_key(setting: str) -> str:
    """The image loss of a setting's validation: the fixed-grid flow loss, or Chameleon's image-token NLL."""
    return "val_image_nll" if setting.startswith("chameleon") else "val_flow"


COLORS = {"dense": "tab:blue", "mot": "tab:red", "moe": "tab:green", "dense_large": "tab:purple"}


def plot(runs: dict[str, list[Run]], out: Path, name: str) -> Path:
    """Rows: settings; columns: validation image loss (diffusion, or Chameleon's image-token NLL) and
    text loss against training FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in runs if runs[s]]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.8 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        image = (("val_image_nll", "val image-token NLL (nats/token)") if image_key(setting) == "val_image_nll"
                 else ("val_flow", "val diffusion loss (fixed t grid)"))
        for ax, key, title in ((row[0], *image),
                               (row[1], "val_lm", "val text loss (nats/token)")):
            for r in runs[setting]:
                pts = [(c["flops"], c[key]) for c in r.curve if c.get(key) is not None]
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.3, color=COLORS.get(r.arm, "gray"),
                        ls="-" if r.seed == runs[setting][0].seed else "--", label=r.label)
            dense = [r for r in runs[setting] if r.arm == "dense"]
            if dense:
                ax.axhline(dense[0].curve[-1][key], color=COLORS["dense"], lw=0.7, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("training FLOPs")
            ax.set_title(f"{setting}: {title}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        row[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _share(f: float | None) -> str:
    return "not reached" if f is None else f"{100 * f:.0f}%"


def _pct(entry: dict) -> str:
    return _share(entry.get("fraction")) + (" (upper bound)" if "upper" in entry["note"] else "")


def table_rows(runs: list[Run]) -> list[dict]:
    key = image_key(runs[0].setting)
    image = "val image NLL" if key == "val_image_nll" else "val diffusion loss"
    return [{"run": r.label, "arch": r.arch, "steps": r.steps, "params total (M)": r.params_total / 1e6,
             "params active (M)": r.params_active / 1e6, "MFLOPs/token": r.flops_per_token / 1e6,
             "train PFLOPs": r.total_flops / 1e15, image: r.curve[-1][key],
             "val text loss": r.curve[-1]["val_lm"], "val ppl": r.curve[-1]["val_ppl"],
             "val caption NLL": r.curve[-1]["val_caption_nll"],
             "prompt-following": r.final.get("prompt_following", "-"), "wall (min)": r.wall_s / 60,
             "CPU (min)": r.cpu_s / 60}
            for r in runs]


MOE_NOTE = ("MoE-4x trains with expert choice within each document, its capacity counted over real tokens "
            "(one expert FFN per real token on average). Within a document expert choice is not causal: whether "
            "an expert takes a token depends on the document's later tokens, so its training text loss can read "
            "a little of the future through the routing. Its validation losses and samples use the causal "
            "per-token router (a predictor trained alongside to imitate expert choice), which reads no future.")


CHAMELEON_NOTE = ("Chameleon setting: text and the shapes images' VQ codes (one tokenizer, trained once and "
                  "shared by every run) in one causal sequence with one next-token loss; the image loss is the "
                  "held-out image-token NLL (`val_image_nll`, nats per code of caption-first documents), the text "
                  "loss (`val_lm`) the held-out captions' next-token loss.")


def _trained_at(runs: dict[str, list[Run]]) -> str:
    """Which code trained the runs (the commit above is the one that wrote this file)."""
    commits = sorted({c for rs in runs.values() for r in rs for c in r.commits})
    shown = ", ".join(f"`{c[:12]}`" for c in commits) if commits else "not recorded (runs from before it was)"
    return f"Runs trained at commit(s): {shown}."


def markdown(runs: dict[str, list[Run]], heads: dict[str, dict], skipped: dict[str, str], name: str) -> str:
    chameleon = any(image_key(s) == "val_image_nll" for s in runs)
    lines = ["# MoT vs dense vs MoE-4x at equal FLOPs per token (small scale"
             + (", Chameleon setting)" if chameleon else ")"), "", "{header}",
             "Same shape, data, seed and steps per setting; `dense_large` has twice the layers (the MoT's "
             "total parameters, ~2x its FLOPs/token). Losses are the runs' validation losses on held-out "
             f"data{'' if chameleon else ' with a fixed t grid and fixed noise'}. Training FLOPs = FLOPs/token (6 per active weight + "
             "attention, `components/flops.py`) x tokens seen (examples x estimated tokens per example). "
             "Wall-clock and CPU time (all threads; a busy machine inflates the first, not the second) "
             "include the runs' periodic validation and final sampling.", "", MOE_NOTE, "",
             *([CHAMELEON_NOTE, ""] if chameleon else []), _trained_at(runs), "", f"![curves]({name}.png)", ""]
    for setting, note in skipped.items():
        lines += [f"**{setting}: skipped** ({note})", ""]
    for setting, rs in runs.items():
        if not rs:
            continue
        h, ik = heads[setting], image_key(setting)
        lines += [f"## {setting}", "", md_table(table_rows(rs)), "", "Headline figures:", ""]
        for arm, label in (("mot", "MoT"), ("moe", "MoE-4x")):
            if f"{arm}_vs_dense" in h:
                e = h[f"{arm}_vs_dense"]
                lines.append(f"- Share of dense's training FLOPs {label} needs to reach dense's final image loss "
                             f"({e[ik]['target']:.4f}): **{_pct(e[ik])}**; its final text loss "
                             f"({e['val_lm']['target']:.4f}): **{_pct(e['val_lm'])}**.")
        if "mot_vs_dense_large" in h:
            e = h["mot_vs_dense_large"]
            img, txt = e[ik], e["val_lm"]
            lines.append(f"- Small MoT vs dense_large ({e['flops_ratio_large_over_mot']:.2f}x MoT's FLOPs at equal "
                         f"tokens): image loss {img['mot_final']:.4f} vs {img['dense_large_final']:.4f} "
                         f"(MoT {'better' if img['mot_better'] else 'not better'}), text loss "
                         f"{txt['mot_final']:.4f} vs {txt['dense_large_final']:.4f} "
                         f"(MoT {'better' if txt['mot_better'] else 'not better'}).")
        for arm, s in h["seed_spread"].items():
            if arm in PAIR:
                lines.append(f"- Seed spread of {arm} (final, max - min over seeds): image "
                             f"{s[ik]['spread']:.4f}, text {s['val_lm']['spread']:.4f}.")
        if "mot_fraction_per_seed" in h["seed_spread"]:
            per = h["seed_spread"]["mot_fraction_per_seed"]
            lines.append("- MoT's share of dense's FLOPs per seed (image / text): " + ", ".join(
                f"s{s}: {_share(v[ik])} / {_share(v['val_lm'])}" for s, v in per.items()))
        lines.append("")
    return "\n".join(lines)

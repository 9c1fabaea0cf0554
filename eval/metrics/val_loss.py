"""Validation losses that compare exactly across runs and checkpoints (SD3 / MoT paper): diffusion loss
on a fixed t grid with fixed noise per image, text perplexity, and the conditional losses text->image
(flow loss given the caption) and image->text (caption NLL given the clean image).

    python eval/metrics/val_loss.py --ckpt runs/main --out eval_out/val                      # the run's held-out split
    python eval/metrics/val_loss.py --ckpt RUN --source webdataset --path 'cc12m/{00000..00009}.tar' --n 5000 --out DIR
    python eval/metrics/val_loss.py --ckpt RUN --source coco --path coco-mini/captions_val2017_subset.json --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import add_device_args, load_pipeline, md_table, write_results

from transfusion_mot.config import replace
from transfusion_mot.data.pipeline import build_records, encode_records
from transfusion_mot.metrics.validation import validation_losses


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--source", default=None, help="imagefolder | coco | webdataset | hf | shapes (default: the run's)")
    p.add_argument("--path", default="", help="data path for --source")
    p.add_argument("--captions", default="", help="captions file where the source needs one")
    p.add_argument("--n", type=int, default=256, help="held-out examples")
    p.add_argument("--grid", type=int, default=8, help="evenly spaced t values")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fixed noise")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True)
    add_device_args(p)
    args = p.parse_args(argv)
    pipe = load_pipeline(args)
    cfg = pipe.cfg
    if args.source:
        cfg = replace(cfg, data={"source": args.source, "path": args.path, "captions": args.captions,
                                 "val_path": "", "val_fraction": 0.0})
        records = build_records(cfg.data, "train")
    else:
        records = build_records(cfg.data, "val")
    pairs = encode_records(records, cfg, pipe.tokenizer, pipe.codec, args.n)
    res = validation_losses(pipe.model, pairs, pipe.specials, grid=args.grid, seed=args.seed,
                            batch_size=args.batch_size)
    result = {"n": len(pairs), "grid": args.grid, "seed": args.seed, "ckpt": args.ckpt,
              "data": getattr(records, "name", args.source), **res.to_dict()}
    rows = [{"t": t, "flow_loss": v} for t, v in res.flow_by_t.items()]
    md = (f"# Validation losses\n\n{{header}}{len(pairs)} held-out examples of `{result['data']}`\n\n"
          f"- diffusion validation loss (mean over the t grid; text->image): **{res.flow:.5f}**\n"
          f"- text perplexity: **{res.perplexity:.3f}** (NLL {res.text_nll:.4f})\n"
          f"- image->text caption NLL: **{res.caption_nll:.4f}**\n\n" + md_table(rows, digits=6) + "\n")
    write_results("results", result, md, Path(args.out))
    print(md)


if __name__ == "__main__":
    main()

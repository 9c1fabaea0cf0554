"""Captioning CIDEr on COCO-format references (pycocoevalcap's CIDEr scorer, as Transfusion reports).

    python eval/metrics/caption_cider.py --ckpt RUN --coco-json ../shared/assets/images/coco-mini/captions_val2017_subset.json \
        --out eval_out/cider [--image-dir DIR] [--n 159]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import add_device_args, load_pipeline, md_table, write_results

from transfusion_mot.metrics.cider import cider


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--coco-json", required=True)
    p.add_argument("--image-dir", default=None, help="default: the json's folder")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="default: the run's sample.temperature")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True)
    add_device_args(p)
    args = p.parse_args(argv)
    path = Path(args.coco_json)
    if not path.is_file():
        raise SystemExit(f"error: --coco-json {path} does not exist")
    data = json.loads(path.read_text())
    image_dir = Path(args.image_dir) if args.image_dir else path.parent
    refs = defaultdict(list)
    for ann in data["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    images = [im for im in data["images"] if refs[im["id"]] and (image_dir / im["file_name"]).is_file()]
    images = images[: args.n] if args.n else images
    if not images:
        raise SystemExit(f"error: no captioned images of {path} found in {image_dir}")
    pipe = load_pipeline(args)
    hyps = {}
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        texts = pipe.caption_files([str(image_dir / im["file_name"]) for im in chunk], temperature=args.temperature)
        hyps.update({im["id"]: text for im, text in zip(chunk, texts)})
    value = cider({k: refs[k] for k in hyps}, hyps)
    examples = [{"image": im["file_name"], "caption": hyps[im["id"]], "reference": refs[im["id"]][0]}
                for im in images[:5]]
    result = {"metric": "CIDEr", "value": value, "n": len(hyps), "ckpt": args.ckpt, "coco_json": str(path),
              "examples": examples}
    write_results("results", result, f"# Captioning CIDEr: {value:.4f} on {len(hyps)} images\n\n{{header}}"
                  + md_table(examples) + "\n", Path(args.out))
    print(f"CIDEr = {value:.4f} ({len(hyps)} images)")


if __name__ == "__main__":
    main()

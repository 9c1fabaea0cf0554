"""FID of images generated from a prompt list against reference images (COCO-30K style).

    python eval/metrics/fid.py --ckpt runs/main --prompts ../shared/assets/prompts/coco_30k.csv --ref-dir COCO_VAL \
        --n 30000 --out eval_out/fid [--backend clean|legacy_tensorflow] [--inception PATH]
    python eval/metrics/fid.py ... --features resnet56 --features-weights resnet56-cifar10.th   # reports FD-resnet56

The Inception (or feature) weights are checked before anything is generated: offline and missing, the
script stops with the file name, where to put it and the flag. Generation is batched, seeded and
resumable (existing images are kept), on ``--device`` (default: CUDA when present) in ``--dtype``, and
splits across processes under ``accelerate launch --num_processes N eval/metrics/fid.py ...`` (each process its
share of the prompts, images written by index; the first process computes the score).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import add_generation_args, generate_for_metric, md_table, read_prompts, write_results

from transfusion_mot.metrics import MissingWeights


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p)
    p.add_argument("--ref-dir", required=True, help="reference images (e.g. COCO val2014 for COCO-30K)")
    p.add_argument("--backend", default="clean", choices=["clean", "legacy_tensorflow", "clean-fid"],
                   help="clean-fid mode: clean (PIL bicubic resize) or legacy_tensorflow (the TF reference resize); "
                        "clean-fid = clean")
    p.add_argument("--inception", default=None, help="local inception-2015-12-05.pt (both modes)")
    p.add_argument("--features", default=None, help="another feature network (e.g. resnet56): reported as FD-<name>")
    p.add_argument("--features-weights", default=None)
    args = p.parse_args(argv)
    from transfusion_mot.metrics.fid import compute_fd, compute_fid, fid_mode, list_images, require_inception

    args.backend = fid_mode(args.backend)  # clean-fid -> clean, as results.json records it

    try:  # weights first: never generate 30k images and then fail
        if args.features:
            from transfusion_mot.metrics.features import build_feature_extractor

            extractor = build_feature_extractor(args.features, args.features_weights)
        else:
            require_inception(args.backend, args.inception)
    except MissingWeights as e:
        raise SystemExit(f"error: {e}")
    if not list_images(args.ref_dir):
        raise SystemExit(f"error: no images in --ref-dir {args.ref_dir}")
    prompts = read_prompts(args.prompts, args.n)
    out = Path(args.out)
    paths, _ = generate_for_metric(args, prompts, out)
    if paths is None:  # under accelerate launch: the first process scores every image
        return
    if args.features:
        score = compute_fd(paths, args.ref_dir, extractor)
        name, value = score.name, score.value
    else:
        name, value = "FID", compute_fid(paths, args.ref_dir, args.backend, args.inception)
    result = {"metric": name, "value": value, "backend": None if args.features else args.backend,
              "n": len(prompts), "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "ckpt": args.ckpt,
              "prompts": args.prompts, "ref_dir": args.ref_dir}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_results("results", result, f"# {name}\n\n{{header}}" + md_table([result]) + "\n", out)
    print(f"{name} = {value:.4f} ({len(prompts)} images)")


if __name__ == "__main__":
    main()

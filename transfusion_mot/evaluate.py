"""In-run evaluation: validation losses, sample grids from held-out prompts, prompt-following on
shapes, and the run's ``report.md``. Runs on the main process; other ranks wait.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .components.tracking import save_grid
from .config import Config
from .data.packing import Specials
from .data.sources import source_spec
from .metrics.validation import Pair, validation_losses


def held_out_prompts(cfg: Config, n: int) -> list[str]:
    """Prompts the model never trained on: the shapes test split, or captions of the val records."""
    if source_spec(cfg.data.source).prompt_following:
        from .metrics.shapes_checker import held_out_prompts as shapes_prompts

        return shapes_prompts(n, split="test", max_shapes=cfg.data.shapes_max_shapes)
    from .data.pipeline import build_records, iter_records

    out = []
    for rec in iter_records(build_records(cfg.data, "val")):
        out.append(rec.captions[0])
        if len(out) == n:
            break
    return out


class Evaluator:
    def __init__(self, cfg: Config, tokenizer, codec, run_dir: str | Path, accelerator=None):
        self.cfg, self.tokenizer, self.codec = cfg, tokenizer, codec
        self.specials = Specials.of(tokenizer)
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self._pairs: list[Pair] | None = None
        self._noted_plug_ins = False
        self._plug_in_docs: list[list] | None = None

    def _note_plug_ins(self) -> None:
        """Sampling knows text and images; a run with plug-in modalities says once that theirs are trained
        (in ``loss_flow``) and validated (``val_flow_<name>``) but not sampled."""
        extra = list(self.cfg.model.extra_modalities)
        if extra and not self._noted_plug_ins and self.is_main:
            say = self.accelerator.print if self.accelerator is not None else print
            say(f"evaluation: plug-in modalities {extra} are trained (in loss_flow) and validated (val_flow_<name>), "
                f"but sampling and prompt-following cover text and images only")
        self._noted_plug_ins = True

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _sync(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def val_pairs(self) -> list[Pair]:
        """Held-out captioned latents, built once (first caption, centre crop)."""
        if self._pairs is None:
            from .data.pipeline import build_records, encode_records

            records = build_records(self.cfg.data, "val")
            self._pairs = encode_records(records, self.cfg, self.tokenizer, self.codec, self.cfg.eval.val_examples)
        return self._pairs

    def validation(self, model) -> dict:
        out = {}
        self._note_plug_ins()
        if self.is_main and self.cfg.model.setting == "chameleon":
            from .metrics.validation import next_token_validation

            out = next_token_validation(model, self.val_pairs(), self.specials, batch_size=self.cfg.eval.batch_size)
        elif self.is_main:
            res = validation_losses(model, self.val_pairs(), self.specials, grid=self.cfg.eval.val_t_grid,
                                    seed=self.cfg.eval.val_seed, batch_size=self.cfg.eval.batch_size)
            out = {**res.to_dict(), **self.plug_in_validation(model)}
        self._sync()
        return out

    def plug_in_validation(self, model) -> dict:
        """``val_flow_<name>`` of each plug-in modality on the first ``eval.val_examples`` held-out records
        that carry plug-in segments (``Record.extras``), with their first caption."""
        if not self.cfg.model.extra_modalities:
            return {}
        if self._plug_in_docs is None:
            from .data.pipeline import build_records, iter_records
            from .data.segments import Text

            self._plug_in_docs = []
            for rec in iter_records(build_records(self.cfg.data, "val")):
                if len(self._plug_in_docs) == self.cfg.eval.val_examples:
                    break
                if rec.extras and rec.captions:
                    ids = self.tokenizer.encode(rec.captions[0])[: self.cfg.data.max_caption_tokens]
                    self._plug_in_docs.append([Text(ids), *rec.extras])
        if not self._plug_in_docs:
            return {}
        from .metrics.validation import plug_in_losses

        return plug_in_losses(model, self._plug_in_docs, self.specials, self.cfg.flow, self.cfg.model.extra_modalities,
                              seed=self.cfg.eval.val_seed, batch_size=self.cfg.eval.batch_size)

    @torch.no_grad()
    def sample_grid(self, model, tag: str, quick: bool = False, n: int | None = None) -> dict:
        """Generate one image per held-out prompt, decode, score (shapes), save ``samples_<tag>.png``."""
        from .sample import generate_images

        result = {}
        self._note_plug_ins()
        if self.is_main:
            n = n or (16 if quick else self.cfg.eval.n_prompts)
            prompts = held_out_prompts(self.cfg, n)
            ids = [self.tokenizer.encode(p)[: self.cfg.data.max_caption_tokens] for p in prompts]
            steps = self.cfg.eval.sample_steps or self.cfg.sample.steps
            t0 = time.time()
            s = self.cfg.sample
            if self.cfg.model.setting == "chameleon":  # codes sampled with CFG on logits, decoded by the VQ model
                from .sample_tokens import generate_image_tokens

                steps = self.cfg.model.latent_size ** 2  # one model call per code
                latents = generate_image_tokens(model, ids, self.specials, cfg_scale=s.cfg_scale,
                                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                                batch_size=self.cfg.eval.batch_size,
                                                n_codes=self.codec.codebook_size)
            else:
                latents = generate_images(model, ids, self.specials, steps=steps, cfg_scale=s.cfg_scale, seed=s.seed,
                                          batch_size=self.cfg.eval.batch_size, scheduler=s.scheduler,
                                          shift=self.cfg.flow.shift)
            images = self.codec.decode(latents.to(next(self.codec.parameters()).device)).float().cpu()
            seconds = time.time() - t0
            scores = None
            if source_spec(self.cfg.data.source).prompt_following:
                from .metrics.shapes_checker import check

                scores = [check(img, p).score for img, p in zip(images, prompts)]
                result["prompt_following"] = sum(scores) / len(scores)
            save_grid(images[:64], prompts[:64], self.run_dir / f"samples_{tag}.png",
                      marks=scores[:64] if scores else None)
            result.update({"sample_seconds": seconds, "sample_steps": steps, "n_prompts": n})
        self._sync()
        return result

    def codec_ceiling(self, n: int) -> float:
        """Prompt-following of the codec's own reconstructions of the real held-out scenes: the most a
        model decoding through it can score (measured 0.52 for a VAE that turned red orange, 0.91 after)."""
        from .metrics.shapes_checker import reconstruction_score

        d = self.cfg.data
        return reconstruction_score(lambda x: self.codec.decode(self.codec.encode(x)).float().cpu(), n=n,
                                    resolution=d.resolution, max_shapes=d.shapes_max_shapes, textured=d.shapes_textured)

    def final(self, model, log) -> str:
        """End-of-run evaluation: validation, the held-out grid, prompt-following, report.md."""
        val = self.validation(model)
        grid = self.sample_grid(model, tag="final")
        summary = ""
        if self.is_main:
            if source_spec(self.cfg.data.source).prompt_following:
                from .metrics.shapes_checker import chance_score

                d = self.cfg.data
                grid["prompt_following_chance"] = chance_score(resolution=d.resolution, max_shapes=d.shapes_max_shapes)
                grid["prompt_following_codec"] = self.codec_ceiling(grid["n_prompts"])
            records = log.read()
            train_last = [r for r in records if "loss_lm" in r][-1]
            results = {"step": train_last["step"], **{k: train_last[k] for k in ("loss_lm", "loss_flow")},
                       **val, **grid}
            log.write({"step": train_last["step"], "final": True, **val, **grid})
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            summary = write_report(self.cfg, results, self.run_dir)
        self._sync()
        return summary


def summary_table(results: dict, chameleon: bool = False) -> str:
    train_rows = ([("train next-token loss (text + image codes)", results.get("loss_lm"))] if chameleon else
                  [("train text loss", results.get("loss_lm")), ("train flow loss", results.get("loss_flow"))])
    rows = [("steps", results.get("step")), *train_rows, ("val diffusion loss (t grid)", results.get("val_flow")),
            ("val image-code NLL (text->image)", results.get("val_image_nll")),
            ("val text perplexity", results.get("val_ppl")), ("val caption NLL (image->text)", results.get("val_caption_nll")),
            ("prompt-following (held-out)", results.get("prompt_following")),
            ("prompt-following, chance", results.get("prompt_following_chance")),
            (f"prompt-following of {'VQ' if chameleon else 'VAE'} reconstructions (ceiling)",
             results.get("prompt_following_codec")),
            ("sampling seconds", results.get("sample_seconds"))]
    lines = ["| metric | value |", "|---|---|"]
    for name, value in rows:
        if value is not None:
            lines.append(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |")
    return "\n".join(lines)


def write_report(cfg: Config, results: dict, run_dir: Path) -> str:
    chameleon = cfg.model.setting == "chameleon"
    table = summary_table(results, chameleon)
    sampling = (f"{cfg.model.latent_size}x{cfg.model.latent_size} VQ codes drawn one by one (temperature "
                f"{cfg.sample.temperature}, top-k {cfg.sample.top_k}, top-p {cfg.sample.top_p}), CFG on logits "
                f"{cfg.sample.cfg_scale}, seed {cfg.sample.seed}" if chameleon else
                f"{results.get('sample_steps')} Euler steps ({cfg.sample.scheduler} grid, shift {cfg.flow.shift}),\n"
                f"  CFG {cfg.sample.cfg_scale}, seed {cfg.sample.seed}")
    text = f"""# {cfg.name}: {cfg.model.arch} on {cfg.data.source}{' (Chameleon setting)' if chameleon else ''}

{table}

- Model: {cfg.model.arch}, dim {cfg.model.dim}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads,
  latents {cfg.model.latent_channels}x{cfg.model.latent_size}x{cfg.model.latent_size}, patch {cfg.model.patch_size}.
- Sampling: {sampling}.
- Prompt-following is the shapes checker's mean score over {results.get('n_prompts')} held-out test prompts
  (colour, shape, count, size and relation facts read back from the pixels); chance is the score of
  real shapes images against unrelated prompts; the ceiling is the score of the real held-out images
  after the VAE's encode + decode against their own captions.

![losses](loss_curves.png)

![samples](samples_final.png)

Files: `config.yaml` (resolved config), `metrics.jsonl`, `results.json`, `model/` (safetensors +
config.json, load with `transfusion_mot.from_pretrained`), `checkpoints/` (resume with `train.resume=auto`).
"""
    (run_dir / "report.md").write_text(text)
    return table

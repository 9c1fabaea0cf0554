"""Every shipped config builds with its own tokenizer and trains one step (issue 18.2).

The paper configs used to fix a 32,000-row vocabulary while the Llama 2 tokenizer appends pad, BOI and
EOI as ids 32000-32002, so the first image document raised an IndexError. Here each config is loaded,
its model built at a shrunken width with the tokenizer it names (Llama 2 from the shared assets for the
paper configs, whose /models path is not here), a real caption->image and image->caption document
packed, and one forward + backward run on random latents of the config's latent shape.
"""
import json
from pathlib import Path

import pytest
import torch

from transfusion_mot import flow, next_token
from transfusion_mot.config import load_config
from transfusion_mot.data.packing import Specials, pack
from transfusion_mot.data.segments import Image, ImageTokens, Text
from transfusion_mot.data.tokenizer import build_tokenizer
from transfusion_mot.model import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SHRINK = ["model.dim=32", "model.n_layers=1", "model.n_heads=2"]


def _caption(cfg, assets: Path) -> str:
    if cfg.data.source == "shapes":
        from transfusion_mot.metrics.shapes_checker import held_out_prompts

        return held_out_prompts(1, split="test", max_shapes=cfg.data.shapes_max_shapes)[0]
    coco = json.loads((assets / "images" / "coco-mini" / "captions_val2017_subset.json").read_text())
    return coco["annotations"][0]["caption"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_packs_and_trains_a_step(path, assets_dir):
    tokenizer_spec = load_config(path).data.tokenizer
    own = [] if Path(tokenizer_spec).name != "tokenizer.model" else [
        f"data.tokenizer={assets_dir / 'tokenizers' / 'llama2' / 'tokenizer.model'}"]  # Llama 2, as named
    cfg = load_config(path, SHRINK + own)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tokenizer.vocab_size)
    assert model.cfg.vocab_size >= tokenizer.vocab_size and model.cfg.vocab_size % 64 == 0
    specials = Specials.of(tokenizer)
    assert max(specials.bos, specials.eos, specials.pad, specials.boi, specials.eoi) < model.cfg.vocab_size

    m = cfg.model
    ids = tokenizer.encode(_caption(cfg, assets_dir))[: cfg.data.max_caption_tokens]
    assert ids
    g = torch.Generator().manual_seed(0)
    chameleon = m.setting == "chameleon"
    if chameleon:  # discrete image codes of the config's grid
        codes = torch.randint(0, m.image_vocab_size, (2, m.latent_size, m.latent_size), generator=g)
        docs = [[Text(ids), ImageTokens(codes[0])], [ImageTokens(codes[1], conditions_text=True), Text(ids)]]
    else:
        latents = torch.randn(2, m.latent_channels, m.latent_size, m.latent_size, generator=g)
        docs = [[Text(ids), Image(latents[0])], [Image(latents[1], conditions_text=True), Text(ids)]]
    n_patches = (m.latent_size // m.patch_size) ** 2
    seq_len = min(cfg.data.seq_len, 2 * (4 + len(ids) + n_patches))
    batch = pack(docs, seq_len, specials, m.patch_size)
    parts = (next_token if chameleon else flow).loss_parts(model, batch, cfg.flow, seed=0)
    loss = parts.total(cfg.flow.loss_weight, m.moe_aux_weight)
    loss.backward()
    assert torch.isfinite(loss) and parts.lm_count > 0 and batch.n_images == (0 if chameleon else 2)
    emb = model.adapters[0].emb  # the text adapter in both settings
    assert emb.weight.grad[specials.boi].abs().sum() > 0  # BOI is embedded and trained


def test_vocab_is_the_tokenizers_rounded_up_and_a_smaller_one_is_refused(tmp_path):
    from dataclasses import replace

    from helpers import VOCAB, debug_config

    cfg = debug_config()
    assert build_model(cfg.model, VOCAB).cfg.vocab_size == 320  # 261 byte ids + specials, rounded up to 64
    assert build_model(replace(cfg.model, vocab_size=300), VOCAB).cfg.vocab_size == 300  # set: kept
    with pytest.raises(ValueError, match=r"model.vocab_size=32000 is smaller than the tokenizer's vocabulary of 32003"):
        build_model(replace(cfg.model, vocab_size=32000), 32003)
    # a training run stops on it before any work (no VAE is trained, nothing is written but the config)
    from transfusion_mot.train import train

    run = tmp_path / "run"
    bad = load_config(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml",
                      [f"train.out_dir={run}", "model.vocab_size=100"])
    with pytest.raises(ValueError, match=r"model.vocab_size=100 is smaller than the tokenizer's vocabulary of 261"):
        train(bad)
    assert not (run / "vae").exists() and not (run / "checkpoints").exists()


def test_sampling_never_emits_the_padding_rows_of_the_lm_head():
    from dataclasses import replace

    from helpers import SPECIALS, VOCAB, debug_model
    from transfusion_mot import sample

    model, _ = debug_model()
    with torch.no_grad():
        model.adapters[0].head.weight[VOCAB:] = 10.0  # rows past the tokenizer would win every argmax
    specials = replace(SPECIALS, vocab=VOCAB)
    for temperature in (0.0, 1.0):
        out = sample.generate_text(model.eval(), [[1, 2, 3]], specials, max_new_tokens=5, temperature=temperature)
        assert out[0] and max(out[0]) < VOCAB

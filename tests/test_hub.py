"""Sharing a trained model (issue 22 #1): the exported folder is self-contained (weights, config, tokenizer,
codec, model card), loads from anywhere, ``save_pretrained`` round-trips, hub ids and ``push_to_hub`` stop at
the network boundary with one clear line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from transfusion_mot import from_pretrained
from transfusion_mot.hub import HubError

PROMPTS = ["a large red circle", "two blue stars"]


def _images(pipe):
    return pipe.generate(PROMPTS, steps=3, cfg_scale=2.0, seed=7, n=2)


def test_copied_model_folder_alone_generates_the_runs_images(debug_run, tmp_path, monkeypatch):
    """The issue's "must show": the run's model/ copied to a fresh folder, the run dir hidden and the cache
    pointed elsewhere, loads there and generates exactly the images the run generates."""
    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    expected = _images(from_pretrained(run))
    fresh = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(run / "model", fresh)
    shutil.rmtree(run)  # the copy of the run: gone
    hidden = debug_run.with_name(debug_run.name + ".hidden")
    monkeypatch.setenv("TRANSFUSION_MOT_CACHE", str(tmp_path / "empty-cache"))
    debug_run.rename(hidden)  # the original run dir (the session's fixture): out of reach while loading
    try:
        pipe = from_pretrained(fresh)
        got = _images(pipe)
    finally:
        hidden.rename(debug_run)
    assert torch.equal(got, expected)
    assert sorted(p.name for p in fresh.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "results.json", "samples.png", "vae"]


def test_model_card_has_config_data_steps_metrics_and_samples(debug_run):
    card = (debug_run / "model" / "README.md").read_text()
    results = json.loads((debug_run / "results.json").read_text())
    assert card.startswith("---\nlibrary_name: transfusion_mot")
    assert "| architecture | mot, " in card and "| data | shapes" in card and "| steps | 12 " in card
    assert f"| loss_flow | {results['loss_flow']:.4g} |" in card
    assert "![samples](samples.png)" in card and (debug_run / "model" / "samples.png").is_file()


@pytest.mark.parametrize("name", ["llama2/tokenizer.model", "gpt2-hf"])
def test_a_tokenizer_given_by_path_travels_in_the_folder(tmp_path, assets_dir, name):
    """A sentencepiece file or a transformers folder is copied into tokenizer/; the config keeps where it
    came from, and loading points it at the copy, which gives the same ids (specials included)."""
    from transfusion_mot.config import load_config
    from transfusion_mot.data.tokenizer import build_tokenizer
    from transfusion_mot.hub import localize, save_tokenizer

    spec = str(assets_dir / "tokenizers" / name)
    save_tokenizer(spec, tmp_path / "model" / "tokenizer")
    cfg = localize(load_config(None, [f"data.tokenizer={spec}"]), tmp_path / "model")
    assert cfg.data.tokenizer == str((tmp_path / "model" / "tokenizer").resolve())
    a, b = build_tokenizer(spec), build_tokenizer(cfg.data.tokenizer)
    text = "a red circle <|boi|> left of two stars"
    assert b.encode(text) == a.encode(text) and b.vocab_size == a.vocab_size
    assert (b.boi_id, b.eoi_id, b.bos_id, b.pad_id) == (a.boi_id, a.eoi_id, a.bos_id, a.pad_id)


def test_save_pretrained_round_trip_keeps_card_and_samples(debug_run, tmp_path):
    pipe = from_pretrained(debug_run)
    first = pipe.save_pretrained(tmp_path / "saved")
    second = from_pretrained(first).save_pretrained(tmp_path / "resaved")  # from a folder, not a run dir
    assert (second / "samples.png").is_file() and "## Results" in (second / "README.md").read_text()
    assert (second / "vae" / "codec.json").read_text() == (debug_run / "vae" / "codec.json").read_text()


def test_save_pretrained_keeps_images(debug_run, tmp_path):
    pipe = from_pretrained(debug_run)
    folder = pipe.save_pretrained(tmp_path / "saved")
    assert torch.equal(_images(from_pretrained(folder)), _images(pipe))


def test_taef2_codec_travels_in_the_folder(debug_run, tmp_path, assets_dir):
    from transfusion_mot.components.checkpoint import export_model
    from transfusion_mot.hub import add_parts

    pipe = from_pretrained(debug_run)
    cfg = pipe.cfg
    cfg.codec.kind, cfg.codec.path = "taef2", str(assets_dir / "vae")
    folder = export_model(pipe.model, cfg, tmp_path / "taef2-model", parts=lambda d: add_parts(d, cfg))
    assert sorted(p.name for p in (folder / "taef2").iterdir()) == ["taef2_decoder.pth", "taef2_encoder.pth"]
    from transfusion_mot.components.checkpoint import load_exported
    from transfusion_mot.hub import localize

    local = localize(load_exported(folder)[0], folder)
    assert local.codec.path == str((folder / "taef2").resolve())


def test_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"model 'someone/no-such-model' is not a local folder and could "
                                                r"not be fetched from the Hugging Face hub"):
        from_pretrained("someone/no-such-model", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained("./no/such/run", device="cpu")


def test_push_to_hub_offline_stops_at_the_network_boundary(debug_run, monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.HfApi.create_repo

    def create_repo(self, *a, **kw):  # reached: everything before the network worked
        calls.append(a or kw)
        return real(self, *a, **kw)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"push_to_hub\('me/tfm-debug'\) could not reach or write the Hugging Face hub"):
        from_pretrained(debug_run).push_to_hub("me/tfm-debug", token="hf_dummy")
    assert calls


def test_diffusers_codec_is_saved_with_save_pretrained(debug_run, tmp_path):
    """codec.kind=diffusers (here the run's own AutoencoderKL folder, standing in for a hub VAE): the folder
    gets it in vae/ via save_pretrained, and the loaded codec decodes exactly as the original."""
    from transfusion_mot.components.checkpoint import export_model, load_exported
    from transfusion_mot.data.codec import load_codec
    from transfusion_mot.hub import add_parts, localize

    pipe = from_pretrained(debug_run)
    cfg = pipe.cfg
    cfg.codec.kind, cfg.codec.path = "diffusers", str(debug_run / "vae")
    original = load_codec(cfg.codec)
    folder = export_model(pipe.model, cfg, tmp_path / "diffusers-model", parts=lambda d: add_parts(d, cfg))
    assert (folder / "vae" / "config.json").is_file() and list((folder / "vae").glob("*.safetensors"))
    local = localize(load_exported(folder)[0], folder)
    assert local.codec.kind == "diffusers" and local.codec.path == str((folder / "vae").resolve())
    z = torch.randn(2, original.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_codec(local.codec).decode(z), original.decode(z))


def _as_old_export(folder, out):
    """A copy of an exported model folder in the format written before issue 21 item 1's refactor: the
    backbone keys flat under ``model`` with ``model.n_modalities``, as the old ``config.to_dict()`` wrote, and
    the weights under the old parameter names (tok_emb, patch_in, t_emb, lm_head, patch_out)."""
    from safetensors.torch import load_file, save_file

    from transfusion_mot.model.transfusion import LEGACY_NAMES

    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    for old, new in LEGACY_NAMES:
        state = {(old + k[len(new):] if k.startswith(new) else k): v for k, v in state.items()}
    assert "tok_emb.weight" in state and not any(k.startswith("adapters.") for k in state)
    save_file(state, out / "model.safetensors")
    tree = json.loads((out / "config.json").read_text())
    tree["model"] = {**{k: v for k, v in tree["model"].items() if k != "backbone"}, **tree["model"]["backbone"],
                     "n_modalities": 2}
    (out / "config.json").write_text(json.dumps(tree, indent=2))
    return out


def test_a_folder_exported_in_the_old_format_still_loads(debug_run, tmp_path):
    """Exported folders (and hub uploads) of older versions load with from_pretrained and generate the same
    images as today's export of the same weights."""
    old = _as_old_export(debug_run / "model", tmp_path / "old-model")
    assert "dim" in json.loads((old / "config.json").read_text())["model"]
    pipe = from_pretrained(old)
    assert pipe.cfg.model == from_pretrained(debug_run).cfg.model
    assert torch.equal(_images(pipe), _images(from_pretrained(debug_run)))

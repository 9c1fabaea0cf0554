"""The Chameleon setting: discrete image tokens packed as causal tokens of the image modality, one
next-token loss over text and image codes (each by its own head), tied MoT == dense, cached sampling ==
uncached, and a debug run that trains, samples and captions end to end."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, debug_overrides

from transfusion_mot import next_token
from transfusion_mot.config import ConfigError, load_config
from transfusion_mot.data.packing import IGNORE, IMAGE, TEXT, pack, unpack
from transfusion_mot.data.segments import ImageTokens, Text
from transfusion_mot.model import Chameleon, build_model, untie_from_dense
from transfusion_mot.model.chameleon import next_token_predict
from transfusion_mot.sample_tokens import caption_image_tokens, generate_image_tokens

from helpers import SPECIALS, VOCAB

CODES = 32  # image vocabulary of the hand-made batches


def chameleon_model(*overrides: str, seed: int = 0) -> Chameleon:
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.size=debug", "model.setting=chameleon", "model.patch_size=1", "codec.kind=vq",
                             "data.resolution=16", "codec.vq_channels=[8, 8, 8]", f"model.image_vocab_size={CODES}",
                             "data.seq_len=64", "data.max_caption_tokens=20", *overrides])
    return build_model(cfg.model, VOCAB)


def token_examples(seed: int = 0, n: int = 4, side: int = 4) -> list[list]:
    """Caption->image, image->caption and text-only documents with random ids and codes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
        codes = ImageTokens(torch.randint(0, CODES, (side, side), generator=g))
        out.append([[Text(ids), codes], [codes, Text(ids)], [Text(ids)]][i % 3])
    return out


def test_image_tokens_are_next_token_targets_across_boi_and_eoi():
    codes = torch.tensor([[5, 6], [7, 8]])
    b = pack([[Text([1, 2]), ImageTokens(codes)], [ImageTokens(codes), Text([3])]], 32, SPECIALS, patch_size=1)
    sp = SPECIALS
    row_tok, row_mod, row_tgt = b.tokens[0].tolist(), b.modality[0].tolist(), b.text_targets[0].tolist()
    # doc 0: BOS 1 2 BOI 5 6 7 8 EOI EOS | doc 1: BOS BOI 5 6 7 8 EOI 3 EOS
    assert row_tok[:19] == [sp.bos, 1, 2, sp.boi, 5, 6, 7, 8, sp.eoi, sp.eos, sp.bos, sp.boi, 5, 6, 7, 8, sp.eoi, 3, sp.eos]
    assert row_mod[:19] == [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 3
    assert row_tgt[:10] == [1, 2, sp.boi, 5, 6, 7, 8, sp.eoi, sp.eos, IGNORE]  # BOI -> first code -> ... -> EOI
    assert row_tgt[10:19] == [sp.boi, 5, 6, 7, 8, sp.eoi, 3, sp.eos, IGNORE]  # no target across documents
    assert (b.image_id == -1).all() and b.n_images == 0  # causal: no bidirectional span, no latents
    predict = next_token_predict(b.modality, b.text_targets)[0].tolist()
    assert predict[:10] == [TEXT, TEXT, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT, TEXT, -1]  # BOI, codes: image head
    docs = unpack(b, sp)
    assert docs[0][0].ids == [1, 2] and torch.equal(docs[0][1].ids, codes)
    assert torch.equal(docs[1][0].ids, codes) and docs[1][1].ids == [3]


def test_next_token_loss_sums_text_and_image_targets_with_their_own_heads():
    model = chameleon_model()
    b = pack(token_examples(), 64, SPECIALS, patch_size=1)
    parts = next_token.loss_parts(model, b)
    # reference: both heads at every position, the one of the next token's modality chosen by hand
    out = model(b, predict=torch.full_like(b.tokens, -1))
    h = out.hidden.reshape(-1, out.hidden.shape[-1])
    tgt, mod = b.text_targets.reshape(-1), b.modality.reshape(-1)
    total, count, n_img = 0.0, 0, 0
    for i in (tgt != IGNORE).nonzero().squeeze(1).tolist():
        head = model.adapters[int(mod[i + 1])].head
        n_img += int(mod[i + 1]) == IMAGE
        total = total + F.cross_entropy(head(h[i:i + 1]).float(), tgt[i:i + 1], reduction="sum")
        count += 1
    assert n_img > 0 and int(parts.lm_count) == count and float(parts.flow_count) == 0
    torch.testing.assert_close(parts.lm_sum, total, rtol=1e-5, atol=1e-4)
    # the image codes are targets: changing one changes the loss; nothing flows
    b2 = b.replace(text_targets=b.text_targets.clone(), tokens=b.tokens.clone())
    j = int(((b.modality.reshape(-1) == IMAGE)).nonzero()[3])
    b2.text_targets.view(-1)[j - 1] = (b.text_targets.view(-1)[j - 1] + 1) % CODES
    assert float(next_token.loss_parts(model, b2).lm_sum.detach()) != pytest.approx(float(parts.lm_sum.detach()))


def test_tied_mot_equals_dense_in_the_chameleon_setting():
    dense = chameleon_model("model.arch=dense")
    for p in dense.parameters():
        p.data.normal_(0, 0.2)
    mot = chameleon_model("model.arch=mot")
    untie_from_dense(mot, dense)
    b = pack(token_examples(), 64, SPECIALS, patch_size=1)
    a, c = next_token.loss_parts(mot, b), next_token.loss_parts(dense, b)
    torch.testing.assert_close(a.lm_sum, c.lm_sum, rtol=1e-5, atol=1e-5)
    assert mot.backbone.n_groups == 2 and mot.num_params() > dense.num_params()  # really untied groups


@pytest.mark.parametrize("cfg_scale,temperature", [(1.0, 0.0), (3.0, 0.0), (3.0, 1.0)])
def test_cached_image_token_sampling_equals_uncached(cfg_scale, temperature):
    model = chameleon_model()
    for p in model.parameters():  # spread the logits so that sampling is not one code everywhere
        p.data.normal_(0, 0.2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], []]
    kw = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=8, seed=3, n_codes=CODES - 4)
    cached = generate_image_tokens(model, prompts, SPECIALS, **kw)
    uncached = generate_image_tokens(model, prompts, SPECIALS, use_cache=False, **kw)
    assert cached.shape == (3, 4, 4) and torch.equal(cached, uncached)
    assert int(cached.max()) < CODES - 4  # the head's rows past the codebook are never drawn
    assert len(cached.unique()) > 1
    one_by_one = torch.cat([generate_image_tokens(model, [p], SPECIALS, first_index=k, **kw)
                            for k, p in enumerate(prompts)])
    assert torch.equal(one_by_one, cached)  # the batch never changes an image


def test_captioning_reads_the_image_codes():
    model = chameleon_model()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    codes = torch.randint(0, CODES, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    a = caption_image_tokens(model, codes, SPECIALS, max_new_tokens=6)
    b = caption_image_tokens(model, torch.stack([codes[1], codes[0]]), SPECIALS, max_new_tokens=6)
    assert a == b[::-1] and a[0] != a[1] and all(len(x) > 0 for x in a)


def test_chameleon_config_checks():
    with pytest.raises(ConfigError, match="codec.kind=vq"):
        load_config(None, ["model.setting=chameleon", "model.patch_size=1"])
    with pytest.raises(ConfigError, match="model.patch_size=2"):
        load_config(None, ["model.setting=chameleon", "codec.kind=vq"])
    with pytest.raises(ConfigError, match="data.source=latents"):
        load_config(str(REPO / "configs" / "chameleon_debug.yaml"), ["data.source=latents", "data.path=/x"])
    cfg = load_config(str(REPO / "configs" / "chameleon_debug.yaml"))
    assert cfg.model.image_vocab_size == cfg.codec.vq_codebook_size and cfg.model.latent_size == 8


def test_debug_chameleon_run_trains_samples_and_captions(tmp_path):
    from transfusion_mot.components.checkpoint import load_exported
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.tokenizer import build_tokenizer
    from transfusion_mot.data.vq_train import load_run_tokenizer
    from transfusion_mot.train import train

    out = tmp_path / "run"
    cfg = load_config(str(REPO / "configs" / "chameleon_debug.yaml"),
                      debug_overrides(out, "train.steps=2", "train.log_every=1", "codec.vq_steps=5",
                                      "eval.n_prompts=2", "eval.val_examples=4"))
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_lm"] for r in rows if "loss_lm" in r and not r.get("final")]
    assert len(losses) == 2 and all(x > 0 for x in losses) and all(r.get("loss_flow", 0) == 0 for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["prompt_following"] <= 1 and results["val_image_nll"] > 0 and results["val_caption_nll"] > 0
    assert (out / "samples_final.png").is_file() and (out / "vq" / "config.json").is_file()
    tokenizer = load_run_tokenizer(cfg, out)
    text_tokenizer = build_tokenizer(cfg.data.tokenizer)
    run_cfg, state = load_exported(out / "model")
    model = build_model(run_cfg.model, text_tokenizer.vocab_size)
    model.load_state_dict(state)
    sp = Specials.of(text_tokenizer)
    codes = generate_image_tokens(model, [[65, 66]], sp, temperature=1.0, top_k=16, n_codes=tokenizer.codebook_size)
    assert codes.shape == (1, 8, 8) and tokenizer.decode(codes).shape == (1, 3, 32, 32)
    assert len(caption_image_tokens(model, codes, sp, max_new_tokens=4)[0]) > 0

    # The exported folder carries its VQ tokenizer (vq/): copied alone elsewhere, with the run moved away,
    # it generates the run's images and captions through the pipeline.
    import shutil

    from transfusion_mot.pretrained import from_pretrained

    alone = tmp_path / "elsewhere" / "model"
    shutil.copytree(out / "model", alone)
    out.rename(tmp_path / "moved")
    assert (alone / "vq" / "config.json").is_file() and "Chameleon-setting" in (alone / "README.md").read_text()
    pipe = from_pretrained(alone, device="cpu")
    images = pipe("a red circle", output_type="pt")
    s = run_cfg.sample
    expected = generate_image_tokens(model, pipe.encode_prompts(["a red circle"]), sp, cfg_scale=s.cfg_scale,
                                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                                     n_codes=tokenizer.codebook_size)
    assert torch.equal(images, tokenizer.decode(expected).float().clamp(0, 1))
    assert len(pipe(["a", "b"], num_images_per_prompt=2)) == 4
    assert isinstance(pipe.caption(images)[0], str)
    with pytest.raises(ValueError, match="Chameleon setting"):
        pipe("a red circle", negative_prompt="blue")
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    with pytest.raises(ValueError, match="Chameleon setting"):
        pipe("a red circle", generator=g)
    assert torch.equal(g.get_state(), state)  # refused before drawing: the caller's generator is untouched


def test_flex_attention_samples_the_same_codes_as_sdpa():
    """``model.attention=flex`` (a BlockMask of the new queries against the cached keys) and SDPA agree."""
    models = [chameleon_model(f"model.attention={a}") for a in ("sdpa", "flex")]
    for m in models:
        torch.manual_seed(1)
        for p in m.parameters():
            p.data.normal_(0, 0.2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    codes = [generate_image_tokens(m, prompts, SPECIALS, cfg_scale=2.0, temperature=1.0, top_k=8, seed=1)
             for m in models]
    assert torch.equal(codes[0], codes[1])
    assert caption_image_tokens(models[0], codes[0], SPECIALS, max_new_tokens=5) == \
        caption_image_tokens(models[1], codes[0], SPECIALS, max_new_tokens=5)


def test_chameleon_run_resumes_exactly(tmp_path):
    """Stopped at step 2 and resumed (the run's own vq/ copy of the tokenizer, the data position, the
    optimizer), a run logs the same losses and ends with the same weights as one that ran straight."""
    from safetensors.torch import load_file

    from transfusion_mot.train import train

    def run(out, *extra):
        cfg = load_config(str(REPO / "configs" / "chameleon_debug.yaml"),
                          debug_overrides(out, "train.steps=4", "train.log_every=1", "train.save_every=2",
                                          "codec.vq_steps=5", "train.ema_decay=0.9", *extra))
        train(cfg, evaluate_at_end=False)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss_lm"]) for r in rows if "loss_lm" in r]

    straight = run(tmp_path / "a")
    assert [s for s, _ in run(tmp_path / "b", "train.stop_after=2")] == [1, 2]
    with pytest.raises(ValueError, match=r"codec.vq_steps: the tokenizer has 5, the config asks for 6"):
        run(tmp_path / "b", "train.resume=auto", "codec.vq_steps=6")  # the run's tokenizer is not swapped
    assert run(tmp_path / "b", "train.resume=auto") == straight
    wa, wb = (load_file(tmp_path / x / "model" / "model.safetensors") for x in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Two gloo processes with half the rows each log the losses one process logs (the next-token loss is
    normalised by the global count of text + image targets)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    config = str(REPO / "configs" / "chameleon_debug.yaml")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    common = debug_overrides("X", "train.steps=3", "train.log_every=1", "train.save_every=3", "codec.vq_steps=5")
    one = [a.replace("X", str(tmp_path / "one")) for a in common] + ["data.batch_size=4"]
    two = [a.replace("X", str(tmp_path / "two")) for a in common] + ["data.batch_size=2"]
    subprocess.run([sys.executable, "-m", "transfusion_mot.train", "--config", config, "--no-eval", *one],
                   check=True, env=env, cwd=REPO, capture_output=True)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    res = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          "-m", "transfusion_mot.train", "--config", config, "--no-eval", *two],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss_lm"]) for r in rows if "loss_lm" in r]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and abs(la - lb) < 1e-5

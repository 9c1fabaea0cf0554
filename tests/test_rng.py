"""Independent random streams: the flow's t and noise are not functions of the data coins (issue 18.1)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from transfusion_mot import flow
from transfusion_mot.config import load_config
from transfusion_mot.data.packing import Specials
from transfusion_mot.data.pipeline import ExampleSource, collate_batch
from transfusion_mot.data.segments import Record
from transfusion_mot.data.tokenizer import ByteTokenizer

N_EXAMPLES = 6000


class _Records:
    """A source of tiny identical records: only the pipeline's random draws differ between examples."""

    name = "tiny"

    def __init__(self, n: int):
        self.n = n
        self.image = PILImage.new("RGB", (16, 16), (120, 30, 200))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:
        return Record(self.image, ["ab", "cd"], key=f"r{i}")


def _draws(t_sampling: str) -> dict[str, np.ndarray]:
    """Coins, t and noise of the first N_EXAMPLES training examples, through the real pipeline."""
    cfg = load_config(None, ["model.size=debug", "data.resolution=16", "model.latent_size=4", "model.patch_size=2",
                             "data.seq_len=64", "data.max_caption_tokens=8", "data.batch_size=8",
                             f"flow.t_sampling={t_sampling}"])
    tok = ByteTokenizer()
    source = ExampleSource(_Records(1000), tok, cfg)
    specials = Specials.of(tok)
    encode = lambda keys, px: torch.zeros(len(keys), 4, 4, 4)  # noqa: E731 (latents do not matter here)
    first, dropped, t, radius1, radius2 = [], [], [], [], []
    g = 0
    while len(first) < N_EXAMPLES:
        examples, _ = source[g]
        g += 1
        batch = collate_batch(examples, encode, cfg, specials)
        bt, noise = flow.draw_t_and_noise(batch, cfg.flow, seed=cfg.train.seed)
        flat = noise.reshape(len(examples), -1)
        first += [ex.caption_first for ex in examples]
        dropped += [ex.caption_first and not ex.caption_ids for ex in examples]
        t += bt.tolist()
        # torch's randn (>= 16 values) turns uniforms u_i, u_i+8 into one Box-Muller pair: elements 0 and 8
        radius1 += flat[:, [0, 8]].norm(dim=1).tolist()
        radius2 += flat[:, [1, 9]].norm(dim=1).tolist()
    return {k: np.array(v) for k, v in dict(first=first, dropped=dropped, t=t, r1=radius1, r2=radius2).items()}


def _ks_independent(a: np.ndarray, b: np.ndarray) -> bool:
    """Two-sample Kolmogorov-Smirnov at alpha = 0.001: True when a and b may share one distribution."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    d = np.abs(cdf_a - cdf_b).max()
    return d < 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


@pytest.fixture(scope="module")
def uniform():
    return _draws("uniform")


def test_noise_is_independent_of_the_data_coins(uniform):
    d = uniform
    first, dropped, kept = d["first"], d["dropped"], d["first"] & ~d["dropped"]
    assert 0.75 < first.mean() < 0.85 and 0.07 < dropped[first].mean() < 0.13  # the coins themselves
    # caption-first vs image-first: same noise radius distribution (it used to separate them perfectly)
    assert _ks_independent(d["r1"][first], d["r1"][~first])
    assert d["r1"][first].max() > d["r1"][~first].min() and d["r1"][~first].max() > d["r1"][first].min()
    # dropped vs kept captions: same radii (dropped examples used to have a near-zero second pair)
    assert _ks_independent(d["r2"][dropped], d["r2"][kept]) and _ks_independent(d["r1"][dropped], d["r1"][kept])
    # t of caption-first examples does not depend on dropout (image-first t is capped by design)
    assert _ks_independent(d["t"][dropped], d["t"][kept])


def test_unconditional_branch_sees_high_t_under_logit_normal():
    d = _draws("logit_normal")
    t_uncond = d["t"][d["dropped"]]
    assert t_uncond.max() > 0.9 and t_uncond.min() < 0.1  # it used to stay inside [0.148, 0.852]
    assert _ks_independent(t_uncond, d["t"][d["first"] & ~d["dropped"]])


def test_streams_differ_by_purpose_seed_and_key():
    from transfusion_mot import rng

    a = rng.normal((64,), 0, 5, purpose="flow_noise")
    assert torch.equal(a, rng.normal((64,), 0, 5, purpose="flow_noise"))  # reproducible
    for other in (rng.normal((64,), 0, 5, purpose="sample_noise"), rng.normal((64,), 1, 5, purpose="flow_noise"),
                  rng.normal((64,), 0, 6, purpose="flow_noise"), rng.normal((64,), 0, 5, 0, purpose="flow_noise")):
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < 0.5
    with pytest.raises(ValueError, match="unknown random stream purpose"):
        rng.stream(0, purpose="flow-noise")

"""MoE-4x (issue 18.3): expert choice routes within each document over real tokens only, so a document's
outputs and the FLOPs per real token do not depend on the batch; the causal router makes cached decoding
equal the full forward; the token-choice auxiliary loss is weighted once under DDP."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import free_port
from helpers import SPECIALS, debug_model, mixed_examples
from transfusion_mot import flow, sample
from transfusion_mot.data.packing import pack
from transfusion_mot.data.segments import Image, Text
from transfusion_mot.metrics.validation import Pair, validation_losses

TESTS = Path(__file__).resolve().parent


def _moe(*overrides, seed: int = 0):
    model, cfg = debug_model("model.arch=moe", *overrides, seed=seed)
    torch.manual_seed(seed + 1)
    nn.init.normal_(model.adapters[1].out.weight, std=0.05)  # a live velocity head (it starts at zero)
    return model, cfg


def _doc(seed: int, n_ids: int = 9):
    g = torch.Generator().manual_seed(seed)
    return [Text(torch.randint(0, 256, (n_ids,), generator=g).tolist()), Image(torch.randn(4, 8, 8, generator=g))]


def _outputs_of_first_doc(model, examples, seq_len, n_rows=None):
    batch = pack(examples, seq_len, SPECIALS, patch_size=2, n_rows=n_rows)
    batch.t = torch.full((batch.n_images,), 0.5)
    out = model(batch)
    first = (batch.doc_id == 0).reshape(-1)
    return out.hidden.reshape(-1, out.hidden.shape[-1])[first], out.velocity[:int(batch.patch_counts()[0])]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_documents_outputs_do_not_depend_on_the_batch(mode):
    """Expert choice (train) and the causal router (eval): one document alone, or packed with others in
    its row, with extra rows, with padding: the same outputs (they changed in 7 of 30 rows before)."""
    model, _ = _moe()
    model.train(mode == "train")
    doc = _doc(0)
    with torch.no_grad():
        alone = _outputs_of_first_doc(model, [doc], seq_len=len(doc[0].ids) + 20)
        crowded = _outputs_of_first_doc(model, [doc, *mixed_examples(seed=3, n=9)], seq_len=96, n_rows=5)
    for a, b in zip(alone, crowded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _ffn_flops(model, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        model(batch)
    counts = counter.get_flop_counts()
    # the SwiGLU matmuls of every block's experts (MoE) or feed-forward (dense); router and predictor excluded
    return sum(sum(ops.values()) for name, ops in counts.items() if ".ffn." in name and name.endswith((".w13", ".w2")))


def test_expert_choice_flops_per_real_token_equal_dense():
    """A padded batch: each real token meets one expert FFN on average (padding took capacity before,
    so a real token got 1.27 expert FFNs in small_moe.yaml)."""
    dense, _ = debug_model("model.arch=dense")
    moe, _ = _moe()
    moe.train()
    examples = mixed_examples(seed=5, n=6)
    batch = pack(examples, 96, SPECIALS, patch_size=2, n_rows=6)  # about half padding
    batch.t = torch.full((batch.n_images,), 0.5)
    real = int((batch.doc_id >= 0).sum())
    assert real < 0.7 * batch.tokens.numel()
    dense_per_token = _ffn_flops(dense, batch) / batch.tokens.numel()  # dense runs every position
    moe_per_real_token = _ffn_flops(moe, batch) / real
    assert moe_per_real_token == pytest.approx(dense_per_token, rel=0.02)
    with FlopCounterMode(display=False) as counter:
        moe(batch)
    with FlopCounterMode(display=False) as dense_counter:
        dense(batch)
    assert counter.get_total_flops() < dense_counter.get_total_flops()  # no expert runs on padding


def _live(model):
    nn.init.normal_(model.adapters[0].head.weight, std=0.5)
    return model.eval()


def test_causal_router_cached_equals_uncached():
    model, _ = _moe()
    _live(model)
    prompts = [[10, 20, 30], [40, 50, 60, 70, 80, 90], [7]]
    for scale in (1.0, 3.0):
        a = sample.generate_images(model, prompts, SPECIALS, steps=4, cfg_scale=scale, seed=1, use_cache=True)
        b = sample.generate_images(model, prompts, SPECIALS, steps=4, cfg_scale=scale, seed=1, use_cache=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # text: one cached token at a time == the logits of the full sequence at every step
    ids = [SPECIALS.bos, 72, 105, 33, 5, 9, 11]
    ctx = sample.Context(model, 1, torch.device("cpu"))
    cached = [ctx.feed_text([ids[:3]], SPECIALS.pad)] + [ctx.feed_text([[i]], SPECIALS.pad) for i in ids[3:]]
    full = model(pack([[Text(ids[1:])]], len(ids) + 1, SPECIALS, 2)).logits[: len(ids)]
    torch.testing.assert_close(torch.cat(cached), full[2:], atol=1e-5, rtol=1e-5)


def test_moe_validation_loss_does_not_depend_on_the_eval_batch_size():
    model, _ = _moe()
    g = torch.Generator().manual_seed(0)
    pairs = [Pair(torch.randn(4, 8, 8, generator=g), torch.randint(0, 256, (int(n),), generator=g).tolist())
             for n in torch.randint(3, 12, (5,), generator=g)]
    a = validation_losses(model, pairs, SPECIALS, grid=2, batch_size=1)
    b = validation_losses(model, pairs, SPECIALS, grid=2, batch_size=5)
    assert a.flow == pytest.approx(b.flow, rel=1e-5) and a.text_nll == pytest.approx(b.text_nll, rel=1e-5)
    assert a.caption_nll == pytest.approx(b.caption_nll, rel=1e-5)


def test_expert_choice_trains_its_causal_predictor():
    """In training, aux_loss is the predictor's cross-entropy; its input is detached, so the loss reaches
    the predictor alone (the router learns only through the gates)."""
    model, _ = _moe()
    model.train()
    batch = pack(mixed_examples(seed=1, n=4), 96, SPECIALS, patch_size=2)
    batch.t = torch.full((batch.n_images,), 0.5)
    out = model(batch)
    assert out.aux_loss > 0
    out.aux_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert grads and all(".predictor." in n for n in grads)


# ------------------------------------------------------------------------------------------------------
# Token choice under DDP: the auxiliary loss is weighted once, not world_size times
# ------------------------------------------------------------------------------------------------------
RANK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from accelerate import Accelerator
    sys.path.insert(0, sys.argv[1])
    from test_moe import dp_setup
    from transfusion_mot.train import train_step

    accelerator = Accelerator(cpu=True)
    model, cfg, batches = dp_setup()
    model = accelerator.prepare(model)
    train_step(model, [batches[accelerator.process_index]], cfg, accelerator, seed=0)
    if accelerator.is_main_process:
        grads = {n: p.grad for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
        torch.save(grads, sys.argv[2])
""")


def dp_setup():
    """A token-choice MoE with a large aux weight and one batch per rank (different lengths)."""
    model, cfg = debug_model("model.arch=moe", "model.moe_routing=token_choice", "model.moe_aux_weight=0.5")
    batches = [pack(mixed_examples(seed=r, n=3 + r), 96, SPECIALS, patch_size=2) for r in range(2)]
    return model, cfg, batches



def test_token_choice_aux_loss_is_weighted_once_under_ddp(tmp_path):
    out = tmp_path / "grads.pt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(TESTS), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    ddp = torch.load(out)

    # The same step by hand in one process: global-count LM / flow losses of both ranks' batches, plus
    # the aux weight times the mean of the ranks' aux losses (what DDP's gradient average should give).
    model, cfg, batches = dp_setup()
    parts = [flow.loss_parts(model, b, cfg.flow, seed=0) for b in batches]
    lm_den = sum(p.lm_count for p in parts).float().clamp(min=1)
    flow_den = sum(p.flow_count for p in parts).float().clamp(min=1)
    loss = sum(p.lm_sum / lm_den + cfg.flow.loss_weight * p.flow_sum / flow_den for p in parts)
    aux = sum(p.aux for p in parts) / len(parts)
    assert aux > 0
    (loss + cfg.model.moe_aux_weight * aux).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)

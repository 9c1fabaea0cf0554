"""The time convention (x_t = (1-t) x0 + t noise, v = noise - x0) and the Euler sampler."""
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from transfusion_mot import flow
from transfusion_mot.config import FlowConfig


def test_noising_matches_diffusers_flow_match_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for i in (0, 3, 7):
        timestep = sched.timesteps[i : i + 1]
        sigma = float(sched.sigmas[i])
        ref = sched.scale_noise(x0, timestep, noise)
        ours = flow.add_noise(x0, noise, torch.full((3,), sigma))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(flow.add_noise(x0, noise, torch.ones(3)), noise)  # t = 1 is pure noise
    assert torch.equal(flow.add_noise(x0, noise, torch.zeros(3)), x0)


def test_target_is_noise_minus_x0_and_is_dx_dt():
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    v = flow.velocity_target(x0, noise)
    torch.testing.assert_close(v, noise - x0)
    t, dt = torch.full((2,), 0.4), 1e-3
    fd = (flow.add_noise(x0, noise, t + dt) - flow.add_noise(x0, noise, t)) / dt
    torch.testing.assert_close(fd, v, atol=1e-3, rtol=1e-3)


def test_euler_with_exact_velocity_reaches_x0():
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)

    def v(x, t):  # along the straight path x_t = x0 + t (noise - x0), exact for any x_t on it
        return (x - x0) / t.view(-1, 1, 1, 1)

    for steps in (1, 7, 250):
        torch.testing.assert_close(flow.euler_sample(v, noise, steps=steps), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.euler_sample(v, noise, steps=20, shift=3.0), x0, atol=1e-5, rtol=1e-5)


def test_cfg_scale_endpoints():
    c, u = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(flow.cfg_velocity(c, u, 1.0), c)
    torch.testing.assert_close(flow.cfg_velocity(c, u, 0.0), u)


def test_t_sampling_ranges_and_shift():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        t = flow.sample_t(4000, FlowConfig(t_sampling=kind), g)
        assert t.min() > 0 and t.max() < 1
        assert abs(float(t.mean()) - 0.5) < 0.03
    shifted = flow.sample_t(4000, FlowConfig(shift=3.0), g)
    assert float(shifted.mean()) > 0.6  # the shift moves time towards noise
    grid = flow.time_grid(4)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and grid == sorted(grid, reverse=True)


def test_same_image_seed_same_noise_any_batch_layout():
    from helpers import mixed_batch

    a = mixed_batch(seed=0, n=6, seq_len=64)
    b = mixed_batch(seed=0, n=6, seq_len=200)  # other packing, same images and seeds
    ta, na = flow.draw_t_and_noise(a, FlowConfig(), seed=3)
    tb, nb = flow.draw_t_and_noise(b, FlowConfig(), seed=3)
    assert torch.equal(ta, tb) and torch.equal(na, nb)
    tc, _ = flow.draw_t_and_noise(a, FlowConfig(), seed=4)
    assert not torch.equal(ta, tc)
    assert (ta[a.conditions_text] <= 0.5).all()  # captioning images: t capped at caption_t_max

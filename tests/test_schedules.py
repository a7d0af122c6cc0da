import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler

from fewstep.schedules import PREDICTIONS, RectifiedFlow, VPCosine, VPDiscrete, student_times


def _schedules():
    return [VPCosine(), RectifiedFlow(),
            VPDiscrete.from_scheduler_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                              "beta_start": 0.00085, "beta_end": 0.012})]


@pytest.mark.parametrize("sched", _schedules(), ids=lambda s: s.kind)
def test_conversions_round_trip(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.96 + 0.02
    xt = sched.add_noise(x0, eps, t)
    for a in PREDICTIONS:
        pa = sched.target(a, x0, eps, t)
        assert torch.allclose(sched.convert(pa, a, "x0", xt, t), x0, atol=1e-6)
        for b in PREDICTIONS:
            pb = sched.convert(pa, a, b, xt, t)
            assert torch.allclose(pb, sched.target(b, x0, eps, t), atol=1e-6), (a, b)
            assert torch.allclose(sched.convert(pb, b, a, xt, t), pa, atol=1e-6), (a, b)


@pytest.mark.parametrize("sched", _schedules(), ids=lambda s: s.kind)
def test_derivatives_match_finite_differences(sched):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64) + 0.00037  # off the discrete grid's knots
    h = 1e-4 if sched.kind != "vp_discrete" else 1e-7
    for f, df in ((sched.alpha, sched.d_alpha), (sched.sigma, sched.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), fd, rtol=1e-3, atol=1e-4)


def test_vp_discrete_matches_diffusers_alphas():
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    s = VPDiscrete.from_scheduler_config(cfg)
    ref = DDPMScheduler(**cfg).alphas_cumprod.double()
    k = torch.arange(1000)
    t = s.timestep_to_t(k.double())
    assert torch.allclose(s.alpha(t) ** 2, ref, rtol=1e-10)
    assert torch.allclose(s.sigma(t) ** 2, 1 - ref, rtol=1e-8, atol=1e-12)
    assert float(s.alpha(torch.tensor(0.0, dtype=torch.float64))) == 1.0  # t = 0 is data
    assert torch.equal(s.t_to_timestep(t).round().long(), k)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_student_grid_is_lcm_scheduler_grid(steps):
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    s = VPDiscrete.from_scheduler_config(cfg)
    lcm = LCMScheduler(**cfg, original_inference_steps=steps)
    lcm.set_timesteps(steps)
    ours = [round(float(s.t_to_timestep(torch.tensor(t, dtype=torch.float64)))) for t in student_times(steps, s)]
    assert ours == lcm.timesteps.tolist()
    if steps == 4:
        assert ours == [999, 749, 499, 249]


def test_renoise_matches_marginal():
    s = VPCosine()
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((200000, 1), 0.7, dtype=torch.float64)
    xs = s.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.full((len(x0),), 0.3))
    xt = s.renoise(xs, torch.full((len(x0),), 0.3), torch.full((len(x0),), 0.8), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    a, sg = s.alpha(torch.tensor(0.8)), s.sigma(torch.tensor(0.8))
    assert abs(float(xt.mean()) - 0.7 * float(a)) < 5e-3
    assert abs(float(xt.std()) - float(sg)) < 5e-3


@pytest.mark.parametrize("objective", ["dmd2", "phased_dmd"])
def test_zero_terminal_snr_teacher_trains_and_exports_one_schedule(objective):
    """A teacher scheduler with rescale_betas_zero_snr: the schedule training uses is the rescaled one (sigma(1) = 1,
    alpha(1) ~ 0), and the exported stock scheduler carries the same alphas_cumprod, so sampling matches training."""
    from fewstep.export import _scheduler_from_spec
    from fewstep.objectives.base import sampler_for

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               prediction_type="v_prediction", rescale_betas_zero_snr=True)
    teacher_sched = DDPMScheduler(**cfg)
    sched = VPDiscrete.from_scheduler_config(teacher_sched.config)
    assert float(sched.sigma(torch.tensor(1.0))) == pytest.approx(1.0, abs=1e-6)
    assert float(sched.alpha(torch.tensor(1.0))) < 1e-3
    plain = VPDiscrete.from_scheduler_config({k: v for k, v in cfg.items() if k != "rescale_betas_zero_snr"})
    assert float(plain.alpha(torch.tensor(1.0))) > 0.05  # without the flag the last step keeps real signal
    if objective == "dmd2":
        spec = sampler_for(sched, 4)
    else:
        from fewstep.objectives.phased_dmd import PhasedDMD

        spec = PhasedDMD.export_spec(type("O", (), {"config": type("C", (), {"transition": "ddim"}), "steps": 4,
                                                    "teacher": type("T", (), {"schedule": sched}),
                                                    "student": type("S", (), {"num_experts": 1})})())
    exported = _scheduler_from_spec(teacher_sched, spec)
    assert exported.config.rescale_betas_zero_snr is True
    k = torch.tensor([249, 499, 749, 998])
    torch.testing.assert_close(exported.alphas_cumprod[k].double().sqrt(), sched.alpha(sched.timestep_to_t(k.double())),
                               rtol=1e-5, atol=1e-7)

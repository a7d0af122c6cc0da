import json

import pytest
import torch

from fewstep.conditions import NULL_CLASS, Condition
from fewstep.schedules import VPCosine
from fewstep.teachers.gmm import BUILTIN, GMMTeacher, Mixture, load_mixture


def test_posterior_mean_matches_monte_carlo_1d():
    mix = Mixture(torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64),
                  torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    sched = VPCosine()
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    x0, _ = mix.sample(n, g)
    t = torch.tensor(0.5, dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    xt = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    # Monte-Carlo E[x0 | x_t in a narrow bin] vs the analytic posterior mean at the bin centre
    for c in (-0.8, 0.0, 0.4, 1.2):
        m = (xt[:, 0] - c).abs() < 0.01
        mc = float(x0[m].mean())
        exact = float(mix.posterior_mean(torch.tensor([[c]], dtype=torch.float64), a.view(1), s.view(1), None))
        assert abs(mc - exact) < 0.02, (c, mc, exact)


def test_teacher_x0_conditional_and_cfg():
    teacher = GMMTeacher(load_mixture("ring8"), "vp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g)
    t = torch.full((16,), 0.6)
    labels = torch.randint(8, (16,), generator=g)
    cond = Condition(class_labels=labels)
    x_c = teacher(x, t, cond)
    x_u = teacher(x, t, cond.null())
    assert torch.allclose(teacher(x, t, cond, guidance_scale=1.0), x_c)
    s = 3.0
    # CFG is linear in the native (v) space; with x_t fixed, x0 is affine in v, so the same mix holds in x0
    assert torch.allclose(teacher(x, t, cond, guidance_scale=s), x_u + s * (x_c - x_u), atol=1e-5)
    # the conditional posterior mean at tiny noise is close to the sample; at full noise it's the class mean
    assert torch.allclose(teacher(x, torch.ones(16), cond), teacher.mixture.means[labels].float(), atol=1e-4)
    assert (x_u - x_c).abs().max() > 1e-3


def test_null_class_is_mixture_mean_at_full_noise():
    teacher = GMMTeacher(load_mixture("ring8"), "flow")
    x = torch.randn(4, 2)
    x0 = teacher(x, torch.ones(4), Condition(class_labels=torch.full((4,), NULL_CLASS)))
    assert torch.allclose(x0, torch.zeros(4, 2), atol=1e-5)


def test_gmm_json_file(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"means": [[0, 0], [3, 3]], "stds": [0.2, 0.3], "weights": [1, 3]}))
    mix = load_mixture(str(p))
    assert mix.num_classes == 2 and torch.allclose(mix.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    bad = tmp_path / "bad.json"
    bad.write_text('{"means": [[0, 0]], "stds": [0.1, 0.2]}')
    with pytest.raises(ValueError, match="malformed GMM file"):
        load_mixture(str(bad))
    with pytest.raises(ValueError, match="unknown GMM teacher"):
        load_mixture("nope")


def test_fresh_trainable_network_equals_teacher():
    teacher = GMMTeacher(BUILTIN["ring8"](), "vp")
    net = teacher.new_network("critic")
    x, t = torch.randn(8, 2), torch.rand(8)
    cond = Condition(class_labels=torch.arange(8))
    assert torch.allclose(net(x, t, cond), teacher(x, t, cond), atol=1e-6)
    assert any(p.requires_grad for p in net.parameters())

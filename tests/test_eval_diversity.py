"""Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020) on known cases."""
import numpy as np
import pytest
import torch

from fewstep.eval.diversity import density_coverage, knn_radii, precision_recall, prdc, subsample


def _mixture(n, modes, rng, std=0.15):
    """``n`` points of an equal-weight mixture of isotropic Gaussians centred at ``modes`` ``(K, D)``."""
    idx = rng.integers(len(modes), size=n)
    return modes[idx] + std * rng.standard_normal((n, modes.shape[1]))


@pytest.fixture(scope="module")
def modes():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 6)) * 3.0  # 8 well-separated modes in 6-d


def test_identical_distributions(modes):
    rng = np.random.default_rng(1)
    real, fake = _mixture(1000, modes, rng), _mixture(1000, modes, rng)
    r = prdc(real, fake)
    # k-NN balls of the same distribution: ~1 up to sampling error (Naeem et al.: P, R ~ 0.9+ at k=3)
    assert r["precision"] > 0.85 and r["recall"] > 0.85, r
    assert r["coverage"] > 0.9 and 0.8 < r["density"] < 1.2, r
    assert (r["k_pr"], r["k_dc"], r["num_real"], r["num_fake"]) == (3, 5, 1000, 1000)
    same = prdc(real, real)  # a set against itself: every point is in its own ball
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0


def test_mode_collapse_keeps_precision_loses_recall(modes):
    rng = np.random.default_rng(2)
    real = _mixture(1000, modes, rng)
    collapsed = _mixture(1000, modes[:2], rng)  # the generator covers 2 of the 8 modes
    r = prdc(real, collapsed)
    assert r["precision"] > 0.85, r  # what it makes is real-looking...
    assert r["recall"] < 0.4 and r["coverage"] < 0.4, r  # ...but 3/4 of the real modes are missed
    assert abs(r["coverage"] - 0.25) < 0.08, r


def test_shifted_distribution_has_low_precision(modes):
    rng = np.random.default_rng(3)
    real = _mixture(800, modes, rng)
    shifted = _mixture(800, modes, rng) + 1.0  # every mode moved by 1 per coordinate (~16 stds)
    r = prdc(real, shifted)
    assert r["precision"] < 0.05 and r["density"] < 0.05 and r["coverage"] < 0.05, r


def test_functions_agree_and_chunking_is_exact(modes):
    rng = np.random.default_rng(4)
    real, fake = _mixture(300, modes, rng), _mixture(200, modes[:5], rng, std=0.2)
    full = prdc(real, fake, k_pr=4, k_dc=6)
    assert prdc(torch.from_numpy(real), torch.from_numpy(fake), k_pr=4, k_dc=6, chunk=7) == full
    assert precision_recall(real, fake, k=4) == (full["precision"], full["recall"])
    assert density_coverage(real, fake, k=6) == (full["density"], full["coverage"])
    # k-th neighbour radius by brute force
    d = np.linalg.norm(real[:, None] - real[None], axis=-1)
    assert np.allclose(knn_radii(torch.from_numpy(real), 3, chunk=11).numpy(), np.sort(d, axis=1)[:, 3])


def test_matches_torch_fidelity_precision_recall(modes):
    """torch-fidelity (installed with torchmetrics[image]) implements the same precision / recall."""
    prc = pytest.importorskip("torch_fidelity.metric_prc")
    rng = np.random.default_rng(5)
    real, fake = _mixture(400, modes, rng), _mixture(300, modes[:3], rng, std=0.25)
    ref = prc.prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                     prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert precision_recall(real, fake, k=3) == pytest.approx((ref["precision"], ref["recall"]), abs=1e-6)  # float32 means


def test_density_by_hand():
    """Two real points 1 apart (k=1 radius 1); fakes at distance 0.5 from both / from one / from none."""
    real = np.array([[0.0], [1.0]])
    fake = np.array([[0.5], [-0.5], [5.0]])
    r = prdc(real, fake, k_pr=1, k_dc=1)
    assert r["density"] == pytest.approx((2 + 1 + 0) / (1 * 3))
    assert r["coverage"] == 1.0 and r["precision"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("kw, msg", [
    (dict(k_pr=10), "precision/recall: k=10 needs more than k real samples, got 10"),
    (dict(k_pr=3, k_dc=12), "density/coverage: k=12 needs more than k real samples, got 10"),
    (dict(k_pr=0, k_dc=0), "both k_pr and k_dc are 0"),
    (dict(k_pr=-1), "k must be a positive integer, got -1"),
])
def test_bad_k_is_one_line_value_error(kw, msg):
    real, fake = np.zeros((10, 2)), np.ones((20, 2))
    with pytest.raises(ValueError, match=msg) as e:
        prdc(real, fake, **kw)
    assert "\n" not in str(e.value)


def test_too_few_generated_and_shape_errors():
    with pytest.raises(ValueError, match="k=3 needs more than k generated samples, got 3"):
        prdc(np.zeros((10, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        prdc(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="2-d array"):
        prdc(np.zeros(10), np.zeros((10, 1)))
    with pytest.raises(ValueError, match="NaN or inf"):
        prdc(np.full((10, 2), np.nan), np.zeros((10, 2)))


def test_subsample():
    x = np.arange(100)[:, None]
    assert subsample(x, None) is x and subsample(x, 200) is x
    s = subsample(x, 10, seed=1)
    assert len(s) == 10 and np.all(np.diff(s[:, 0]) > 0) and np.array_equal(s, subsample(x, 10, seed=1))


def test_cli_defaults_are_the_module_defaults():
    from fewstep.eval import commands, diversity
    from fewstep.eval.compare import DIVERSITY_COLUMNS

    assert (commands.DEFAULT_K_PR, commands.DEFAULT_K_DC, commands.DEFAULT_MAX_REF) == (
        diversity.DEFAULT_K_PR, diversity.DEFAULT_K_DC, diversity.DEFAULT_MAX_REF)
    assert DIVERSITY_COLUMNS == diversity.DIVERSITY_KEYS

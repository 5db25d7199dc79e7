"""The gradient noise scale: estimator arithmetic, agreement with an exact per-example reference
through training, the finite-population correction, and the training-loop tracker."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from components import models, noise_scale

MICRO, ACCUMULATION, N_BATCHES = 64, 4, 1000  # big batch 256: a fifth of digits' 1259 training examples
CHECKPOINTS = (0, 300, 1250, 1500)  # SGD steps; val accuracy 0.07, 0.92, 0.952, 0.952


def exact_noise_scale(model, x, y):
    """(B_simple, |G|^2, tr Sigma) from every per-example gradient; Sigma with the population (1/N)
    definition, which is what the finite-population correction assumes."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.reshape(len(x), -1) for v in per_example.values()], dim=1).double()
    mean = g.mean(dim=0)
    grad_sq, trace = mean.pow(2).sum().item(), (g - mean).pow(2).sum(dim=1).mean().item()
    return trace / grad_sq, grad_sq, trace


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # thousands of tiny backward passes: a second OpenMP thread gains nothing and, on a
    # shared 2-core machine, its spin-waiting made them ten times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def training(digits):
    """Train an MLP with plain SGD; at each checkpoint keep the weights, the exact reference,
    the validation accuracy and the per-batch squared norms the estimator works from."""
    x, y = (torch.as_tensor(a) for a in digits.split("train"))
    x_val, y_val = (torch.as_tensor(a) for a in digits.split("val"))
    torch.manual_seed(0)
    model = models.mlp(digits.input_shape, digits.output_dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    draws = torch.Generator().manual_seed(0)
    points, step = {}, 0
    for checkpoint in CHECKPOINTS:
        for step in range(step, checkpoint):
            idx = torch.randint(len(x), (32,), generator=draws)
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        step = checkpoint
        with torch.no_grad():
            accuracy = (model(x_val).argmax(dim=1) == y_val).double().mean().item()
        norms = noise_scale.batch_sq_norms(model, F.cross_entropy, x, y, MICRO, ACCUMULATION, N_BATCHES,
                                           torch.Generator().manual_seed(checkpoint))
        points[checkpoint] = {"exact": exact_noise_scale(model, x, y), "accuracy": accuracy, "norms": norms,
                              "state": {k: v.clone() for k, v in model.state_dict().items()}}
    return {"x": x, "y": y, "model": model, "points": points}


def estimate_at(point, population):
    return noise_scale.estimate(*point["norms"], MICRO, MICRO * ACCUMULATION, population)


def relative_error(value, exact):
    return abs(value - exact) / exact if math.isfinite(value) else math.inf


def test_estimate_agrees_with_the_exact_per_example_reference_through_training(training):
    n = len(training["x"])
    assert training["points"][CHECKPOINTS[-1]]["accuracy"] > 0.95  # well into training, where the bias matters
    for step, point in training["points"].items():
        exact = point["exact"][0]
        est = estimate_at(point, population=n)
        assert relative_error(est.b_simple, exact) < 0.2, (step, est.b_simple, exact)
        assert abs(est.b_simple - exact) < 4 * est.spread, (step, est.b_simple, exact, est.spread)
        assert est.grad_sq == pytest.approx(point["exact"][1], rel=0.2)
        assert est.trace == pytest.approx(point["exact"][2], rel=0.05)
    # B_simple grows as training goes on: from ~70 at initialisation to beyond the dataset size
    b = [p["exact"][0] for p in training["points"].values()]
    assert b[0] < 100 and b[-1] > n


def test_measure_is_the_estimate_over_fresh_batches_and_spread_is_calibrated(training):
    point = training["points"][CHECKPOINTS[0]]
    model = training["model"]
    model.load_state_dict(point["state"])
    n, small, big = len(training["x"]), *point["norms"]
    # the same seed draws the same first 100 batches as the fixture's 1000
    result = noise_scale.measure(model, F.cross_entropy, training["x"], training["y"], MICRO, ACCUMULATION,
                                 100, torch.Generator().manual_seed(CHECKPOINTS[0]))
    assert result == noise_scale.estimate(small[:100], big[:100], MICRO, MICRO * ACCUMULATION, n)
    assert (result.n_batches, result.small_batch, result.big_batch) == (100, MICRO, MICRO * ACCUMULATION)
    assert set(result.to_dict()) == {"b_simple", "grad_sq", "trace", "spread", "n_batches", "small_batch", "big_batch"}
    # the delta-method spread against the scatter of ten independent groups of 100 batches
    groups = [noise_scale.estimate(s, b, MICRO, MICRO * ACCUMULATION, n).b_simple
              for s, b in zip(small.split(100), big.split(100))]
    scatter = torch.tensor(groups).std().item() / math.sqrt(len(groups))
    spread = estimate_at(point, n).spread
    assert 0.5 < spread / scatter < 2.0, (spread, scatter)


def test_without_the_finite_population_correction_late_estimates_are_far_too_high(training):
    """Uncorrected, |G|^2 comes out low by tr(Sigma)/(N-1), so B_simple reads about B / (1 - B/N)."""
    n = len(training["x"])
    point = training["points"][1250]
    exact = point["exact"][0]
    corrected, uncorrected = estimate_at(point, n), estimate_at(point, None)
    assert relative_error(corrected.b_simple, exact) < 0.2
    assert relative_error(uncorrected.b_simple, exact) > 0.4 > relative_error(corrected.b_simple, exact)
    assert uncorrected.b_simple == pytest.approx(exact / (1 - exact / (n - 1)), rel=0.2)
    # once B_simple exceeds N, the uncorrected |G|^2 estimate is negative: no noise scale at all
    late = training["points"][1500]
    assert late["exact"][0] > n
    assert estimate_at(late, None).grad_sq < 0 and math.isnan(estimate_at(late, None).b_simple)
    assert relative_error(estimate_at(late, n).b_simple, late["exact"][0]) < 0.2


def test_drawing_with_replacement_needs_no_correction(training):
    model = training["model"]
    point = training["points"][1250]
    model.load_state_dict(point["state"])
    result = noise_scale.measure(model, F.cross_entropy, training["x"], training["y"], MICRO, ACCUMULATION,
                                 N_BATCHES, torch.Generator().manual_seed(1), with_replacement=True)
    assert relative_error(result.b_simple, point["exact"][0]) < 0.2


def test_measure_leaves_parameters_grads_mode_and_random_stream_alone(digits):
    x, y = (torch.as_tensor(a[:256]) for a in digits.split("train"))
    torch.manual_seed(0)
    model = models.mlp(digits.input_shape, digits.output_dim, dropout=0.5)
    F.cross_entropy(model(x[:8]), y[:8]).backward()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    result = noise_scale.measure(model, F.cross_entropy, x, y, 16, 4, 5, torch.Generator().manual_seed(0))
    assert result.trace > 0 and result.n_batches == 5
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_batch_sizes_that_cannot_work_are_refused(digits):
    x, y = (torch.as_tensor(a[:100]) for a in digits.split("train"))
    model = models.mlp(digits.input_shape, digits.output_dim)
    with pytest.raises(ValueError, match="accumulation must be at least 2"):
        noise_scale.measure(model, F.cross_entropy, x, y, 16, 1, 5, torch.Generator())
    with pytest.raises(ValueError, match=r"big batch 128 \(32 x 4\) is larger than the 100 examples"):
        noise_scale.measure(model, F.cross_entropy, x, y, 32, 4, 5, torch.Generator())


def test_unbiased_estimates_on_hand_computed_numbers():
    # |G|^2 = 1, tr Sigma = 8: E|G_2|^2 = 1 + 8/2 = 5, E|G_8|^2 = 1 + 8/8 = 2; in the paper's
    # form, |G|^2 = (8 x 2 - 2 x 5) / (8 - 2) and tr Sigma = (5 - 2) / (1/2 - 1/8)
    assert noise_scale.unbiased_estimates(5.0, 2.0, 2, 8) == (1.0, 8.0)
    # N = 9, |G|^2 = 1, tr Sigma = 64: c(2) = 7/16, c(8) = 1/64, so E|G_2|^2 = 29, E|G_8|^2 = 2
    assert noise_scale.unbiased_estimates(29.0, 2.0, 2, 8, population=9) == pytest.approx((1.0, 64.0))
    # a "batch" of the whole population is G itself
    grad_sq, _ = noise_scale.unbiased_estimates(29.0, 2.0, 2, 9, population=9)
    assert grad_sq == 2.0


def expected_sq_norms(grad_sq, trace, batch, population=None):
    return grad_sq + trace * noise_scale.inverse_batch(batch, population)


def test_tracker_converges_to_the_ratio_and_follows_it_as_it_moves():
    tracker = noise_scale.NoiseScaleTracker(decay=0.95)
    assert tracker.value is None
    noise = torch.Generator().manual_seed(0)
    for grad_sq, trace in ((0.5, 40.0), (0.1, 40.0)):  # B_simple 80, then 400
        for _ in range(300):
            wobble = 1 + 0.05 * torch.randn(9, generator=noise)  # noisy norms with the right expectations
            micro = [expected_sq_norms(grad_sq, trace, 64) * w.item() for w in wobble[:8]]
            tracker.update(micro, expected_sq_norms(grad_sq, trace, 512) * wobble[8].item(), 64, 512)
        assert tracker.value == pytest.approx(trace / grad_sq, rel=0.1)


def test_tracker_applies_the_population_correction():
    norms = ([expected_sq_norms(0.1, 40.0, 8, 500)] * 4, expected_sq_norms(0.1, 40.0, 32, 500), 8, 32)
    corrected, uncorrected = noise_scale.NoiseScaleTracker(population=500), noise_scale.NoiseScaleTracker()
    corrected.update(*norms)
    uncorrected.update(*norms)
    assert corrected.value == pytest.approx(400.0)
    assert uncorrected.value == pytest.approx(400 / (1 - 400 / 499) * 500 / 499)  # B / (1 - B/(N-1)), x N/(N-1)


def test_tracker_says_none_while_the_gradient_is_below_the_noise():
    tracker = noise_scale.NoiseScaleTracker()
    tracker.update([1.0, 1.0], 1.0, 8, 16)  # no drop from micro to big batch: |G|^2 = 1, tr Sigma = 0
    assert tracker.value == 0.0
    tracker = noise_scale.NoiseScaleTracker()
    tracker.update([1.0, 1.0], 0.4, 8, 16)  # a drop larger than noise alone explains: |G|^2 < 0
    assert tracker.value is None


def test_grad_norms_give_the_micro_and_big_batch_norms_an_accumulating_loop_needs(digits):
    """The cheap recipe in NoiseScaleTracker's docstring: after the first scaled micro-backward,
    k^2 x its squared grad norm is that micro-batch's |g|^2; after the last, the big batch's."""
    x, y = (torch.as_tensor(a[:64]) for a in digits.split("train"))
    torch.manual_seed(0)
    model = models.mlp(digits.input_shape, digits.output_dim)
    params = list(model.parameters())
    k, micro = 4, 16
    first = torch.autograd.grad(F.cross_entropy(model(x[:micro]), y[:micro]), params)
    big = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    for m in range(k):
        (F.cross_entropy(model(x[m * micro:(m + 1) * micro]), y[m * micro:(m + 1) * micro]) / k).backward()
        if m == 0:
            first_norms = noise_scale.grad_norms(params)  # a snapshot: later backwards add to .grad
    first_sq, big_sq = noise_scale.squared_totals(first_norms, noise_scale.grad_norms(params))
    assert k ** 2 * first_sq == pytest.approx(sum(g.pow(2).sum().item() for g in first), rel=1e-5)
    assert big_sq == pytest.approx(sum(g.pow(2).sum().item() for g in big), rel=1e-5)
    assert noise_scale.squared_totals(noise_scale.grad_norms(torch.nn.Linear(2, 2).parameters())) == [0.0]
    # a parameter whose first gradient came after the first micro-batch: the lists differ in length
    assert noise_scale.squared_totals([torch.tensor(3.0)], [torch.tensor(1.0), torch.tensor(2.0)]) == [9.0, 5.0]

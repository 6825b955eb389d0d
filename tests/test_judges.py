"""Each judge on hand-made readouts: no training, no tensors, plain numbers in, findings out (microseconds)."""

import math
import random
import statistics

import pytest

from callbacks._stats import Summary
from callbacks._trace import TraceRows
from callbacks.judges.base import Action, Readouts
from callbacks.judges.health import (
    DeadUnits,
    LearningRate,
    NonFinite,
    Saturation,
    VanishingGradients,
    VanishingParameterGradients,
)
from callbacks.judges.init import InitCheck
from callbacks.judges.lr import SLOW, LearningRateAdvice, slow_descent, trend, typical_ratio
from callbacks.judges.outliers import OutlierActivations
from callbacks.judges.spikes import LossSpikes, robust_z
from callbacks.probes.activation import Activations, Layer
from callbacks.probes.gradient import Gradients, LayerGradient
from callbacks.probes.loss import Loss
from callbacks.probes.parameter import ParameterGradient, ParameterGradients
from callbacks.probes.update import UpdateRatios


def summary(mean=0.0, std=1.0, count=1000, lo=-3.0, hi=3.0, order=0, nonfinite=0, rank=-1) -> Summary:
    sum_squares = (std**2 * (count - 1) + mean**2 * count) if count else 0.0
    return Summary(count, nonfinite, mean, std, lo, hi, mean * count, sum_squares, order=order, nonfinite_rank=rank)


def tanh(name, std=0.6, saturation=0.05, order=0, norm=None) -> Layer:
    s = summary(std=std, lo=-1.0, hi=1.0, order=order)
    return Layer(name, f"{name} (Tanh)", "bounded", s, saturation, None, None, norm)


def relu(name, dead, below="none", kind="ReLU") -> Layer:
    return Layer(name, f"{name} ({kind})", "relu_like", summary(), None, dead, below, None)


def acts(*layers, step=0) -> Readouts:
    return Readouts.of(Activations(step, list(layers)))


# ---------------------------------------------------------------------------------------- the health warnings
def test_saturation_is_reported_once_after_its_patience():
    judge = Saturation(limit=0.4, threshold=0.97, patience=3)
    found = [judge.observe(s, acts(tanh("h", saturation=0.6))) for s in range(5)]
    assert [len(f) for f in found] == [0, 0, 1, 0, 0]
    (f,) = found[2]
    assert f.key == "saturation/h" and f.where == "h (Tanh)" and "60.0%" in f.message and "Kaiming" in f.fix
    # a healthy step breaks the streak
    judge = Saturation(limit=0.4, threshold=0.97, patience=3)
    seq = [0.6, 0.6, 0.1, 0.6, 0.6]
    assert sum(len(judge.observe(s, acts(tanh("h", saturation=v)))) for s, v in enumerate(seq)) == 0


def test_saturation_after_a_norm_advises_the_learning_rate():
    judge = Saturation(limit=0.4, threshold=0.97, patience=1)
    (f,) = judge.observe(0, acts(tanh("h", saturation=0.5, norm="bn (BatchNorm1d)")))
    assert "`bn (BatchNorm1d)`" in f.fix and "learning rate" in f.fix


@pytest.mark.parametrize(
    ("below", "kind", "says"),
    [("none", "ReLU", "no gradient"), ("some", "GELU", "small (not zero)"), ("some", "SiLU", "small (not zero)")],
)
def test_dead_units_say_what_is_true_for_each_activation(below, kind, says):
    judge = DeadUnits(limit=0.1, patience=1)
    (f,) = judge.observe(0, acts(relu("r", dead=0.6, below=below, kind=kind)))
    assert says in f.message and f"r ({kind})" in f.message
    if below == "some":
        assert "no gradient" not in f.message and "> 50%" in f.message
    else:
        assert "> 10%" in f.message


def test_never_positive_gelu_units_are_judged_against_a_higher_limit():
    # a trained Transformer's GELUs: 20 % of (token, feature) units never positive in a batch, and they still learn
    judge = DeadUnits(limit=0.1, patience=1)
    assert judge.observe(0, acts(relu("g", dead=0.2, below="some", kind="GELU"))) == []
    (f,) = judge.observe(0, acts(relu("r", dead=0.2, below="none", kind="ReLU")))  # a ReLU's are dead
    assert f.where == "r (ReLU)"
    # a user's limit above the GELU floor holds for both
    judge = DeadUnits(limit=0.7, patience=1)
    assert judge.observe(0, acts(relu("g", dead=0.6, below="some", kind="GELU"))) == []


def test_units_dead_from_step_zero_get_a_new_init_and_units_that_died_later_a_lower_learning_rate():
    judge = DeadUnits(limit=0.1, patience=3)
    # "early" is dead from step 0 (before any update): the init did it; "late" dies from step 10 on
    steps = {0: (0.6, 0.0), 5: (0.6, 0.0), 10: (0.6, 0.5), 15: (0.6, 0.5), 20: (0.6, 0.5)}
    found = []
    for step, (early, late) in steps.items():
        found += judge.observe(step, acts(relu("early", dead=early), relu("late", dead=late)))
    by = {f.where: f for f in found}
    assert (by["early (ReLU)"].step, by["late (ReLU)"].step) == (10, 20)
    assert by["early (ReLU)"].action == Action("init", ("early",), "kaiming", "60% dead from step 0")
    assert "dead at initialisation" in by["early (ReLU)"].message and "Re-initialise" in by["early (ReLU)"].fix
    assert by["late (ReLU)"].action == Action("scale_lr", (), 0.1, "50% dead units")
    # a resumed fit remembers where each streak began (its first step was 0)
    resumed = DeadUnits(limit=0.1, patience=3)
    resumed.load_state_dict(judge.state_dict())
    assert (resumed.first, resumed.since) == (0, {"dead/early": 0, "dead/late": 10})
    # a fit that starts later (resumed without that state) cannot tell: the learning rate, as before
    later = DeadUnits(limit=0.1, patience=1)
    (f,) = later.observe(40, acts(relu("early", dead=0.6)))
    assert f.action.kind == "scale_lr"


def test_vanishing_gradients_against_the_largest_layer():
    judge = VanishingGradients(ratio=1e-2, patience=1)
    grads = Gradients(
        0, [LayerGradient("a", "a (Tanh)", summary(std=1e-5)), LayerGradient("b", "b (Tanh)", summary(std=1e-2))]
    )
    (f,) = judge.observe(0, Readouts.of(grads))
    assert f.where == "a (Tanh)" and "1.00e-05" in f.message and "1.00e-02" in f.message


def test_vanishing_parameter_gradients():
    judge = VanishingParameterGradients(limit=1e-5, patience=2)
    p = ParameterGradient("w", (4, 4), summary(std=1.0), summary(std=1e-7), 1e-7)
    readout = Readouts.of(ParameterGradients(0, [p], []))
    assert judge.observe(0, readout) == [] and len(judge.observe(1, readout)) == 1


def test_learning_rate_reads_the_median_parameter():
    judge = LearningRate(low=-4.0, high=-2.0, patience=2)
    # one parameter far above (an output layer scaled down at init): the median is fine, nothing to say
    fine = Readouts.of(UpdateRatios(0, {"a": -3.0, "b": -3.1, "head": -0.5}, [], {}, {}))
    assert judge.observe(0, fine) == [] and judge.observe(1, fine) == []
    high = Readouts.of(UpdateRatios(0, {"a": -1.5, "b": -1.6, "head": -0.5}, [], {}, {}))
    assert judge.observe(2, high) == []
    (f,) = judge.observe(3, high)
    assert f.key == "lr/high" and "is -1.50 > -2.0" in f.message and "`head` -0.50" in f.message
    assert f.severity == "note" and "weighs it against the loss" in f.fix  # the ratio alone: a hypothesis


def test_learning_rate_takes_each_ratio_at_the_peak_learning_rate():
    # a step schedule dropped the lr 10x (1e-3 -> 1e-4): every ratio one decade lower on purpose, not "too low"
    judge = LearningRate(low=-4.0, high=-2.0, patience=2)
    lrs = {n: [1e-3, 1e-3, 1e-4] for n in ("a", "b", "c")}
    dropped = Readouts.of(UpdateRatios(0, {"a": -4.1, "b": -4.2, "c": -4.3}, [], {}, lrs))
    assert judge.observe(0, dropped) == [] and judge.observe(1, dropped) == []  # -3.2 at the peak lr
    # two decades below at the peak lr is too low, and the message says at which lr it was judged
    low = Readouts.of(UpdateRatios(0, {"a": -5.1, "b": -5.2, "c": -5.3}, [], {}, lrs))
    assert judge.observe(2, low) == []
    (f,) = judge.observe(3, low)
    assert f.key == "lr/low" and "at the peak learning rate so far is -4.20 < -4.0" in f.message


def test_the_peak_learning_rate_is_read_from_a_history_growing_in_place():
    # the probe appends to each parameter's lr list every recorded step; the judge reads each new entry once
    from callbacks.judges.health import _Peaks

    peaks, lrs = _Peaks(), [1e-4]
    shifts = [peaks.below_peak("a", lrs)]
    for lr in (1e-3, 1e-4, math.nan, 1e-5):
        lrs.append(lr)
        shifts.append(peaks.below_peak("a", lrs))
    assert shifts == pytest.approx([0.0, 0.0, 1.0, 0.0, 2.0])  # NaN last: the lr is not known
    assert peaks.below_peak("a", [1e-5]) == 0.0  # another list (a new fit): read from its start
    assert peaks.below_peak("a", [2e-5, 1e-5, 1e-5]) == pytest.approx(math.log10(2))


def test_nonfinite_names_the_first_module_in_forward_order():
    judge = NonFinite(Activations)
    late = tanh("late")
    late.summary = summary(order=2, nonfinite=3, rank=1)
    early = tanh("early")
    early.summary = summary(order=0, nonfinite=1, rank=0)
    (f,) = judge.observe(7, acts(late, early, tanh("fine", order=1)))
    assert "first at `early (Tanh)` (of 2 affected, in forward order), step 7, rank 0" in f.message
    assert f.message.startswith("3 non-finite values (NaN/inf) in `activation/late`")


# ---------------------------------------------------------------------------------------- the init check
def _init(loss=3.3, classes=27, layers=(), grads=(), params=(), biases=()) -> Readouts:
    out: list[object] = [Loss(0, loss, classes, "`head` (Linear, out_features=27)")]
    if layers:
        out.append(Activations(0, list(layers)))
    if grads:
        out.append(Gradients(0, list(grads)))
    if params or biases:
        out.append(ParameterGradients(0, list(params), list(biases)))
    return Readouts.of(*out)


def test_init_loss_against_the_uniform_guess():
    (f,) = InitCheck().observe(0, _init(loss=27.88))
    assert f.key == "init/loss" and f.where == "head" and "27.88" in f.message and "3.30 = ln(27)" in f.message
    assert "0.01" in f.fix and "bias" in f.fix
    assert InitCheck().observe(0, _init(loss=3.32)) == []  # the lecture's softmax fix: about ln 27
    assert InitCheck().observe(0, _init(loss=27.88, classes=None)) == []  # no C: no claim
    assert InitCheck().observe(5, _init(loss=27.88)) == []  # only at initialisation


def test_init_check_runs_once_a_fit():
    judge = InitCheck()
    assert len(judge.observe(0, _init(loss=27.88))) == 1 and judge.observe(0, _init(loss=27.88)) == []
    judge.reset()
    assert len(judge.observe(0, _init(loss=27.88))) == 1


def test_init_saturation_and_the_fix_in_the_lectures_terms():
    found = InitCheck().observe(0, _init(layers=[tanh("h", saturation=0.61)]))
    (f,) = found
    assert f.where == "h (Tanh)" and "61%" in f.message and "1 - t²" in f.message and "gain 5/3 for Tanh" in f.fix


def test_init_signal_shrinking_with_depth():
    stds = [0.6, 0.35, 0.2, 0.11, 0.06]
    layers = [tanh(f"b{i}", std=s, saturation=0.0, order=i) for i, s in enumerate(stds)]
    (f,) = InitCheck().observe(0, _init(layers=layers))
    assert f.key == "init/vanishing/Tanh" and f.where == "b4 (Tanh)" and "(0.10×)" in f.message
    assert "gain 5/3 for Tanh" in f.fix
    steady = [tanh(f"b{i}", std=0.6, saturation=0.02, order=i) for i in range(5)]  # Kaiming + BatchNorm: steady
    assert InitCheck().observe(0, _init(layers=steady)) == []


def test_init_gradients_vanishing_toward_the_input():
    # gradients arrive in backward order: the last layer first (order 0)
    stds = {"b0": 1e-5, "b1": 1e-4, "b2": 1e-3}
    grads = [LayerGradient(n, f"{n} (Tanh)", summary(std=s, order=2 - i)) for i, (n, s) in enumerate(stds.items())]
    (f,) = InitCheck().observe(0, _init(grads=grads))
    assert f.key == "init/gradients/vanish" and f.where == "b0 (Tanh)" and "0.01×" in f.message


@pytest.mark.parametrize(("first_to_last", "vanishing"), [(0.095, True), (0.5, False), (1.13, False)])
def test_init_gradients_vanishing_threshold(first_to_last, vanishing):
    # 0.095: a deep tanh stack at PyTorch's default init (0.58x a layer); 1.13: the gallery's healthiest worst
    stds = [first_to_last, first_to_last**0.5, 1.0]  # first layer to last, in forward order
    grads = [LayerGradient(f"b{i}", f"b{i} (Tanh)", summary(std=s, order=2 - i)) for i, s in enumerate(stds)]
    found = InitCheck().observe(0, _init(grads=grads))
    assert [f.key for f in found] == (["init/gradients/vanish"] if vanishing else [])


def _param(name, ratio, data_std=1.0):
    return ParameterGradient(name, (2, 2), summary(std=data_std), summary(std=ratio * data_std), ratio)


def test_init_grad_to_data_outliers_the_output_layer_is_a_note():
    params = [_param("a", 0.003), _param("b", 0.004), _param("c", 0.002), _param("head", 2.0, data_std=0.003)]
    (f,) = InitCheck().observe(0, _init(params=params))
    assert f.where == "head" and f.severity == "note" and "Expected" in f.fix
    params[3] = _param("head", 2.0, data_std=1.0)  # not small weights: a problem
    (f,) = InitCheck().observe(0, _init(params=params))
    assert f.severity == "problem"


def test_init_grad_to_data_far_below_the_median():
    # the GPT-2 init: residual projections initialised small sit above the rest, the other matrices ~10x below the
    # median (a healthy GPT: 9.7x at most); the embedding under a vanishing deep stack: 46x below
    median = 0.5
    params = [_param(f"proj{i}", median, data_std=0.007) for i in range(3)] + [_param("fc", median / 9.7)]
    assert InitCheck().observe(0, _init(params=params)) == []
    params.append(_param("embedding", median / 46))
    (f,) = InitCheck().observe(0, _init(params=params))
    assert f.where == "embedding" and f.severity == "problem" and "below the median" in f.message
    assert "vanishing before they reach it" in f.fix


def test_init_bias_before_batchnorm_is_a_note():
    (f,) = InitCheck().observe(0, _init(biases=[("lin.bias", "bn (BatchNorm1d)")]))
    assert f.severity == "note" and f.where == "lin.bias" and "bias=False" in f.fix


# ---------------------------------------------------------------------------------------- learning-rate advice
def _ratios(history: dict, lrs: dict | None = None, output: str | None = None) -> Readouts:
    steps = list(range(len(next(iter(history.values())))))
    lrs = lrs or {n: [0.1] * len(v) for n, v in history.items()}
    return Readouts.of(UpdateRatios(steps[-1], {}, steps, history, lrs, output))


def test_typical_ratio_is_the_peak_lr_phase_after_the_first_tenth():
    history = [-1.0] * 2 + [-3.0] * 18 + [-4.0] * 20  # settling, the peak phase, then the lr drops 10x
    lrs = [0.1] * 20 + [0.01] * 20
    assert typical_ratio(history, lrs) == -3.0
    assert typical_ratio([-3.0] * 3, [0.1] * 3) is None  # too few points


def test_typical_ratio_under_warm_up_and_cosine_decay():
    # warm-up over 2 points, then a cosine decay to a tenth: the ratio follows the lr (-2.5 at the peak lr)
    lrs = [1e-3 * (i + 1) / 2 for i in range(2)]
    lrs += [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 18))) for t in range(19)]
    history = [-2.5 + math.log10(lr / 1e-3) for lr in lrs]
    # the points within 2x of the peak (its first half), each brought to the peak: -2.5
    assert typical_ratio(history, lrs) == pytest.approx(-2.5)
    # read at the peak only, this schedule would leave two points, fewer than the five the advice needs
    assert sum(lr >= 1e-3 * (1 - 1e-9) for lr in lrs) == 2


def test_lr_advice_for_the_model():
    high = _ratios({"a": [-1.9] * 20, "b": [-2.0] * 20, "c": [-1.8] * 20})
    (f,) = LearningRateAdvice().conclude(99, high)
    assert f.key == "lr/model" and "too high" in f.message and "10^-1.9" in f.message and "~13×" in f.message
    # no loss to back the ratio: a note, no action (issue 24: the ratio alone is a hypothesis)
    assert f.severity == "note" and f.action is None and "about 13× smaller" in f.fix
    judge = LearningRateAdvice()
    for loss in [3.0, 2.5, 2.3, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9]:  # the loss rose from its best 2.3 to 2.85
        judge.observe(1, Readouts.of(Loss(1, loss, 27, "given")))
    (f,) = judge.conclude(99, high)
    assert f.severity == "problem" and "rising" in f.message
    # one decade at most: 10, not the 13 the ratio says
    assert "Divide the learning rate by about 10" in f.fix and f.action == Action(
        "scale_lr", (), 0.1, f.action.evidence
    )
    (f,) = LearningRateAdvice().conclude(99, _ratios({"a": [-5.1] * 20, "b": [-5.0] * 20}))
    assert "too low" in f.message and "Multiply" in f.fix and f.action.value == pytest.approx(100)  # 112 capped at 100


def test_lr_advice_for_one_layer_and_the_output_layers_exception():
    history = {"blocks.0.weight": [-3.0] * 20, "blocks.4.weight": [-1.9] * 20, "blocks.2.weight": [-3.1] * 20}
    (f,) = LearningRateAdvice().conclude(99, _ratios(history))
    assert f.where == "blocks.4.weight" and "10^-1.9" in f.message and "~13×" in f.message
    assert "too high for this layer" in f.message and "13× smaller" in f.fix
    (f,) = LearningRateAdvice().conclude(99, _ratios(history, output="blocks.4.weight"))
    assert f.severity == "note" and "output layer" in f.message
    assert LearningRateAdvice().conclude(99, _ratios({"a": [-3.0] * 20, "b": [-2.7] * 20})) == []  # healthy


def _judged(losses: list[float], start: float = 3.3, classes: int = 27) -> LearningRateAdvice:
    """A LearningRateAdvice that saw step 0's loss ``start`` (27 classes: ln 27 = 3.30) and then ``losses``."""
    judge = LearningRateAdvice()
    judge.observe(0, Readouts.of(Loss(0, start, classes, "given")))
    for i, loss in enumerate(losses, 1):
        judge.observe(i, Readouts.of(Loss(i, loss, classes, "given")))
    restored = LearningRateAdvice()  # a resumed fit judges the same: everything it needs is in its state
    restored.load_state_dict(judge.state_dict())
    return restored


def test_slow_descent_by_hand():
    # fifths of two points: medians 3.175, 3.075, 2.975, 2.875, 2.775; late drop 3.075 - 2.775 = 0.3 over the
    # early drop 3.3 - 3.075 = 0.225
    line = [3.2, 3.15, 3.1, 3.05, 3.0, 2.95, 2.9, 2.85, 2.8, 2.75]
    assert slow_descent(line, 3.3) == pytest.approx(0.3 / 0.225)
    # a loss that levels off: medians 2.45, 2.325, 2.3, 2.3, 2.3: 0.025 / 0.975
    assert slow_descent([2.5, 2.4, 2.35, 2.3, 2.3, 2.3, 2.3, 2.3, 2.3, 2.3], 3.3) == pytest.approx(0.025 / 0.975)
    assert slow_descent([3.3] * 10, 3.3) is None  # not falling: no late drop
    assert slow_descent(line[:8], 3.3) is None  # fewer than two points a fifth
    # a late drop within the noise: alternating +-0.3 around a line falling 0.01 a point
    noisy = [3.0 - 0.01 * i + (0.3 if i % 2 else -0.3) for i in range(40)]
    assert slow_descent(noisy, 3.3) is None


def test_lr_from_the_loss_alone_when_the_ratio_is_in_the_band():
    in_band = _ratios({"a": [-3.2] * 20, "b": [-3.0] * 20})
    # the fault zoo's AdamW GPT at lr / 100 (its recorded fifths): falling as fast at the end as at the start
    slow = [3.2, 3.13, 3.1, 3.1, 3.02, 3.01, 2.94, 2.93, 2.92, 2.91]
    (f,) = _judged(slow).conclude(99, in_band)
    assert f.severity == "problem" and f.key == "lr/model" and "as fast at the end" in f.message
    assert "10^-3.1" in f.message and "within the lecture's band" in f.message
    assert f.action == Action("scale_lr", (), 10.0, f.action.evidence)
    # a healthy fit's loss levels off (the zoo's GPT base: 0.22 of its early drop late): nothing
    assert _judged([2.65, 2.63, 2.6, 2.59, 2.46, 2.44, 2.27, 2.26, 2.44, 2.43]).conclude(99, in_band) == []
    # a loss that ended above where it started: too high, whatever the ratio (the zoo's deep net at lr x 100)
    (f,) = _judged([180.0, 240, 210, 200, 220, 230, 225, 215, 222, 224]).conclude(99, in_band)
    assert f.severity == "problem" and "above where it started (3.30)" in f.fix + f.message
    assert f.action.value == pytest.approx(0.1)
    (f,) = _judged([3.0, math.nan] * 5).conclude(99, in_band)
    assert "non-finite" in f.message and f.action.value == pytest.approx(0.1)
    # swinging by more than all it fell (the zoo's blobs MLP at lr x 100 ended below its start, 1.8)
    (f,) = _judged([0.6, 2.9, 0.5, 3.0, 0.7, 2.8, 0.4, 3.1, 0.6, 2.9], start=1.8).conclude(99, in_band)
    assert "swung" in f.message and f.action.value == pytest.approx(0.1)
    # no ratio at all (a diverged fit records none): the loss still decides
    (f,) = _judged([3.0, math.nan] * 5).conclude(99, _ratios({"a": [math.nan] * 20}))
    assert f.action.value == pytest.approx(0.1)


def test_trend_is_the_t_statistic_of_the_least_squares_slope():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for losses in ([2.0, 1.9, 2.1, 1.8, 1.9, 1.7], [3.0 - 0.002 * i + rng.gauss(0, 0.05) for i in range(60)]):
        fit = stats.linregress(range(len(losses)), losses)
        assert trend(losses) == pytest.approx(fit.slope / fit.stderr)
    assert trend([1.0, 2.0]) == 0.0 and trend([1.0, 1.0, 1.0]) == 0.0


def test_a_fresh_classifier_whose_loss_barely_moved_is_too_low_a_learning_rate():
    in_band = _ratios({"a": [-3.2] * 20, "b": [-3.0] * 20})
    # 10 classes (ln 10 = 2.30), started at 2.33: 0.06 down over the first fifth, then 0.015 more over the rest (not
    # "slow"), 3.2 % in all, creeping down all along (the fault zoo's CNN at SGD lr / 100 fell 4.5 %, too noisy for
    # the slow-descent rule)
    rng = random.Random(1)
    creeping = [2.33 - 0.06 * min(i, 12) / 12 - 0.015 * max(i - 12, 0) / 48 + rng.gauss(0, 0.005) for i in range(60)]
    assert (slow_descent(creeping, 2.33) or 0) < SLOW and trend(creeping) < -3
    (f,) = _judged(creeping, start=2.33, classes=10).conclude(99, in_band)
    assert f.severity == "problem" and "barely moved" in f.message and f.action.value == pytest.approx(10.0)
    # a fine-tuned model (step 0 far below ln C) creeping down the same way: not judged so
    assert _judged([v - 1.5 for v in creeping], start=0.83, classes=10).conclude(99, in_band) == []
    # flat (no trend): nothing to say about the learning rate
    flat = [2.3 + rng.gauss(0, 0.04) for _ in range(60)]
    assert _judged(flat, start=2.33, classes=10).conclude(99, in_band) == []


def test_no_layer_advice_against_the_models_own():
    # the loss blew up (the lr is too high for the model): the layers whose ratio sits low beside the others get no
    # "raise its learning rate" (the fault zoo's deep net at lr x 100 was told x 100 for two of its layers)
    history = {"a": [-3.0] * 20, "b": [-3.1] * 20, "c": [-4.6] * 20, "d": [-1.2] * 20}
    blown = _judged([180.0, 240, 210, 200, 220, 230, 225, 215, 222, 224])
    found = blown.conclude(99, _ratios(history))
    assert [(f.key, f.action.value) for f in found] == [("lr/model", pytest.approx(0.1)), ("lr/d", pytest.approx(0.1))]
    # no model-wide problem: the same layers get their own advice, both ways
    found = LearningRateAdvice().conclude(99, _ratios(history))
    assert [f.key for f in found] == ["lr/c", "lr/d"]


def test_a_loss_that_blew_up_wins_over_a_ratio_that_reads_low():
    # the fault zoo's deep net at lr x 100: the loss went from 3.3 to ~200, its saturated units pass no gradient, so
    # the updates read 10^-6.4: still a learning rate too high, not too low
    low = _ratios({"a": [-6.4] * 20, "b": [-6.3] * 20, "c": [-7.3] * 20})
    found = _judged([155.5, 196.6, 181.8, 178.8, 185.5, 178.5, 150.9, 172.4, 197.7, 165.8]).conclude(99, low)
    (f,) = [f for f in found if f.key == "lr/model"]
    assert f.severity == "problem" and f.action.value == pytest.approx(0.1) and "reads low, 10^-6.4" in f.message
    assert [g.key for g in found] == ["lr/model"]  # and no layer is told to go faster
    # an oscillating loss with a low ratio: no verdict from the loss (they disagree)
    swinging = _judged([0.6, 2.9, 0.5, 3.0, 0.7, 2.8, 0.4, 3.1, 0.6, 2.9], start=1.8)
    assert all(f.action is None or f.action.value > 1 for f in swinging.conclude(99, low))


def test_the_loss_alone_never_contradicts_the_ratio():
    slow = [3.2, 3.13, 3.1, 3.1, 3.02, 3.01, 2.94, 2.93, 2.92, 2.91]
    assert slow_descent(slow, 3.3) >= SLOW
    # the ratio says too high (and the loss did not rise): the slow loss does not turn it into "too low"
    (f,) = _judged(slow).conclude(99, _ratios({"a": [-1.9] * 20, "b": [-1.8] * 20}))
    assert f.severity == "note" and "too high" in f.message and f.action is None
    # the ratio says too low and the loss is slow but its last fifth fell less than FALL ("plateaued"): the slow
    # descent is the loss's evidence, and the advice becomes a problem
    (f,) = _judged(slow).conclude(99, _ratios({"a": [-5.1] * 20, "b": [-5.0] * 20}))
    assert f.severity == "problem" and f.action.value == pytest.approx(10.0)


# ---------------------------------------------------------------------------------------- loss spikes
def _trace(n: int, spike_at: int | None = None, mover: str | None = None, lead: int = 0, seed: int = 0) -> TraceRows:
    """A noisy flat trace of loss, three layers' update ratios and gradient norms; optionally a loss spike at
    ``spike_at`` and ``mover``'s statistic jumping ``lead`` steps before it."""
    rng = random.Random(seed)
    columns = ["loss", *(f"upd/l{i}" for i in range(3)), *(f"grad/l{i}" for i in range(3))]
    rows = []
    for t in range(n):
        row = [2.0 + rng.gauss(0, 0.02), *(-3.0 + rng.gauss(0, 0.05) for _ in range(3))]
        row += [1.0 * math.exp(rng.gauss(0, 0.05)) for _ in range(3)]
        if spike_at is not None and t >= spike_at:
            row[0] = 5.0 if t == spike_at else 2.0 + rng.gauss(0, 0.02)
        if mover is not None and spike_at is not None and spike_at - lead <= t <= spike_at:
            row[columns.index(mover)] = -1.0 if mover.startswith("upd") else 30.0
        rows.append(row)
    return TraceRows(columns, list(range(n)), rows)


def test_robust_z_by_hand():
    z, median = robust_z(10.0, [1.0, 2.0, 3.0, 4.0, 5.0])  # median 3, MAD 1 -> sigma 1.4826
    assert median == 3.0 and z == pytest.approx(7 / 1.4826)


def test_a_loss_spike_names_the_layer_that_moved_first_and_how_early():
    judge = LossSpikes()
    (f,) = judge.observe(299, Readouts.of(_trace(300, spike_at=200, mover="upd/l1", lead=3)))
    assert f.step == 200 and f.where == "l1"
    assert "update:data ratio of `l1`, 3 steps before the loss" in f.message and "learning rate" in f.fix


def test_a_corrupted_batch_moves_the_gradients_with_the_loss():
    (f,) = LossSpikes().observe(299, Readouts.of(_trace(300, spike_at=200, mover="grad/l2", lead=0)))
    assert "gradient norm of `l2`, at the same step as the loss" in f.message and "bad batch" in f.fix


def test_an_update_at_the_spikes_own_step_comes_after_its_loss():
    # a step's update is made after its loss: at the spike's step it is a consequence, never the first mover
    trace = _trace(300, spike_at=200, mover="upd/l0", lead=0, seed=1)
    for row in trace.rows[200:201]:
        row[trace.columns.index("grad/l1")] = 3.0  # the gradients move with the loss, less than the update
    (f,) = LossSpikes().observe(299, Readouts.of(trace))
    assert f.where == "l1" and "gradient norm of `l1`, at the same step" in f.message and "bad batch" in f.fix


def test_a_loss_bump_of_robust_z_7_is_noise_not_a_spike():
    # a healthy GPT's per-batch loss reached z 5.7 in 1,000 steps: 10 robust sigmas make a spike, 7 do not
    trace = _trace(300, seed=2)
    median = statistics.median(row[0] for row in trace.rows[100:200])
    mad = statistics.median(abs(row[0] - median) for row in trace.rows[100:200]) * 1.4826
    trace.rows[200][0] = median + 7 * mad
    assert LossSpikes(min_rise=0).observe(299, Readouts.of(trace)) == []
    trace.rows[200][0] = median + 12 * mad
    (f,) = LossSpikes(min_rise=0).observe(299, Readouts.of(trace))
    assert f.step == 200
    # the same z with a rise of 12 x 0.03 nats < 0.5: a spike too small to matter (a loss near 0 on an easy task)
    assert 12 * mad < 0.5 and LossSpikes().observe(299, Readouts.of(trace)) == []


def test_no_spike_in_noise_and_the_trace_read_in_pieces():
    judge = LossSpikes()
    whole = _trace(600, seed=3)
    for start in range(0, 600, 50):  # as the recorder reads it: the rows since the last read
        piece = TraceRows(whole.columns, whole.steps[start : start + 50], whole.rows[start : start + 50])
        assert judge.observe(start + 49, Readouts.of(piece)) == []


# ---------------------------------------------------------------------------------------- outlier activations
def test_outlier_activations():
    judge = OutlierActivations(ratio=50.0, patience=2)
    normal = Layer("g", "g (GELU)", "relu_like", summary(std=1.0, lo=-0.2, hi=5.0), None, 0.0, "some", None)
    outlier = Layer("g", "g (GELU)", "relu_like", summary(std=1.0, lo=-0.2, hi=400.0), None, 0.0, "some", None)
    assert judge.observe(0, acts(normal)) == [] and judge.observe(1, acts(outlier)) == []
    (f,) = judge.observe(2, acts(outlier))
    assert f.where == "g (GELU)" and "400" in f.message and "400×" in f.message

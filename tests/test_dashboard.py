"""The real TensorBoard server serves the monitors' dashboard: the custom-scalars layout (one chart per question,
every layer on it) and, through the plugin's own HTTP API, the data of every chart's tags."""

import urllib.parse
import urllib.request

import pytest
import torch

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from tests.callbacks_helpers import TanhMLP, fixed_loader, get_json, saturating_batch, tensorboard_server, trainer

RUN = "run/version_0"
STEPS = 4


def test_tensorboard_serves_the_layout_and_every_charts_tags(tmp_path):
    # three monitors in a group, one alone: their charts merge into one layout, in the dashboard's order
    group = CallbackGroup([ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)])
    alone = [ParameterMonitor(every_n_steps=1), UpdateRatioMonitor(every_n_steps=1)]
    t = trainer(tmp_path, [group, *alone], max_steps=STEPS, log_every_n_steps=1)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(16), STEPS))

    with tensorboard_server(tmp_path) as server:
        base = f"{server.url}/data/plugin/custom_scalars"
        layout = server.poll(lambda: get_json(f"{base}/layout"), timeout=90)
        assert layout, "no custom-scalars layout served within 90 s"

        (category,) = layout["category"]
        assert category["title"] == "training health"
        charts = {c["title"]: c["multiline"]["tag"] for c in category["chart"]}
        titles = list(charts)
        order = ["loss", "learning rate", "activation saturation", "dead units", "activation std"]
        order += ["activation gradient std", "weight grad:data", "update:data ratio"]
        assert [next(o for o in order if title.startswith(o)) for title in titles] == order

        # every layer is a run of its own (TensorBoard gives each its colour and lists it by name), and so is
        # the update ratio's guide line at -3
        runs = server.poll(lambda: get_json(f"{server.url}/data/runs"), timeout=30)
        layers = {"act (Tanh)", "relu (ReLU)", "hidden.weight", "head.weight"}
        assert {RUN, *(f"{RUN}/layers/{layer}" for layer in layers), f"{RUN}/guide 1e-3"} <= set(runs)

        # every chart's lines, fetched through the plugin's own scalars route, run by run
        served: dict[str, dict[str, list]] = {}
        for title, patterns in charts.items():
            served[title] = {}
            for run in runs:
                for pattern in patterns:
                    query = urllib.parse.urlencode({"run": run, "tag": pattern})
                    reply = get_json(f"{base}/scalars?{query}")
                    assert reply["regex_valid"], pattern
                    for tag, events in reply["tag_to_events"].items():
                        served[title][f"{run.removeprefix(RUN + '/')}: {tag}"] = events
        expected = {
            "loss": {"run/version_0: train/loss"},
            "learning rate": set(),  # TanhMLP logs none (train.py logs train/lr)
            "activation saturation": {"layers/act (Tanh): activation/saturation"},
            "dead units": {"layers/relu (ReLU): activation/dead"},
            "activation std": {"layers/act (Tanh): activation/std", "layers/relu (ReLU): activation/std"},
            "activation gradient std": {
                "layers/act (Tanh): activation_grad/std",
                "layers/relu (ReLU): activation_grad/std",
            },
            "weight grad:data": {
                "layers/hidden.weight: param_grad/grad_to_data",
                "layers/head.weight: param_grad/grad_to_data",
            },
            "update:data ratio": {
                "layers/hidden.weight: update_ratio",
                "layers/head.weight: update_ratio",
                "guide 1e-3: update_ratio",
            },
        }
        for title, lines in served.items():
            key = next(o for o in order if title.startswith(o))
            assert set(lines) == {line.replace("run/version_0: ", f"{RUN}: ") for line in expected[key]}, title
            assert all(len(events) == STEPS for events in lines.values()), title
        # the guide is -3 on every step
        assert {value for _w, _s, value in served[titles[-1]]["guide 1e-3: update_ratio"]} == {-3.0}
        # the served values are the statistics: saturation of tanh(x) computed here
        h = torch.tanh(saturating_batch(16))
        saturation = (h.abs() > 0.97).float().mean().item()
        for _wall, _step, value in served[titles[2]]["layers/act (Tanh): activation/saturation"]:
            assert value == pytest.approx(saturation)


def test_charts_without_an_order_follow_the_numbered_ones_as_first_written(tmp_path):
    """A new probe's chart needs no slot: the numbered (built-in) charts by number, then the others as first seen."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks._writers import CATEGORY, LOSS_CHART, LR_CHART, TensorBoardWriter
    from callbacks.probes.base import Chart, Scalar

    writer = TensorBoardWriter(TensorBoardLogger(tmp_path))
    mine, theirs = Chart("mine", "mine/x"), Chart("theirs", "theirs/x")
    late, early = Chart("late", "late/x", order=60), Chart("early", "early/x", order=10)
    writer.scalars([Scalar(f"{c.series}/a", 1.0, "a", c) for c in (mine, late, theirs, early)], step=0)
    assert list(writer.layout()[CATEGORY]) == [LOSS_CHART, LR_CHART, "early", "late", "mine", "theirs"]

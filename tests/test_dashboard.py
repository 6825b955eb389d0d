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
        order = ["loss", "activation saturation", "dead units", "activation std", "activation gradient std"]
        order += ["weight grad:data", "update:data ratio"]
        assert [next(o for o in order if title.startswith(o)) for title in titles] == order
        assert "-3" in titles[-1]  # the update ratio's guide is in its title

        # every chart's tags, fetched through the plugin's own scalars route
        served: dict[str, dict[str, list]] = {}
        for title, patterns in charts.items():
            served[title] = {}
            for pattern in patterns:
                query = urllib.parse.urlencode({"run": RUN, "tag": pattern})
                reply = get_json(f"{base}/scalars?{query}")
                assert reply["regex_valid"], pattern
                served[title].update(reply["tag_to_events"])
        expected = {
            "loss": {"train/loss"},
            "activation saturation": {"activation/act/saturation"},
            "dead units": {"activation/relu/dead"},
            "activation std": {"activation/act/std", "activation/relu/std"},
            "activation gradient std": {"activation_grad/act/std", "activation_grad/relu/std"},
            "weight grad:data": {"param_grad/hidden.weight/grad_to_data", "param_grad/head.weight/grad_to_data"},
            "update:data ratio": {"update_ratio/hidden.weight", "update_ratio/head.weight"},
        }
        for title, tags in served.items():
            key = next(o for o in order if title.startswith(o))
            assert set(tags) == expected[key], title
            assert all(len(events) == STEPS for events in tags.values()), title
        # forward order within a chart: the tanh layer is called before the ReLU branch
        assert charts[titles[3]] == ["^activation/act/std$", "^activation/relu/std$"]
        # the served values are the statistics: saturation of tanh(x) computed here
        h = torch.tanh(saturating_batch(16))
        saturation = (h.abs() > 0.97).float().mean().item()
        for _wall, _step, value in served[titles[1]]["activation/act/saturation"]:
            assert value == pytest.approx(saturation)

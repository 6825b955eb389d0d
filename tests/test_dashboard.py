"""The real TensorBoard server serves the monitors' dashboard: the custom-scalars layout (one chart per question,
every layer on it) and, through the plugin's own HTTP API, the data of every chart's tags."""

import contextlib
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from tests.callbacks_helpers import TanhMLP, fixed_loader, free_port, get_json, saturating_batch, trainer

RUN = "run/version_0"
STEPS = 4


def test_tensorboard_serves_the_layout_and_every_charts_tags(tmp_path):
    # three monitors in a group, one alone: their charts merge into one layout, in the dashboard's order
    group = CallbackGroup([ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)])
    alone = [ParameterMonitor(every_n_steps=1), UpdateRatioMonitor(every_n_steps=1)]
    t = trainer(tmp_path, [group, *alone], max_steps=STEPS, log_every_n_steps=1)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(16), STEPS))

    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path)]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/data/plugin/custom_scalars"
    try:
        layout: dict = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not layout:
            with contextlib.suppress(OSError):  # not listening yet
                layout = get_json(f"{base}/layout")
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
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
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

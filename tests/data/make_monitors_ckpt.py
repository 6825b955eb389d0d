"""Writes ``monitors_v1.ckpt``: a checkpoint of the four monitors as they were before the pipeline rewrite.

Run once at commit 5bca1d6 (the last commit before ``callbacks/`` became probes -> recorder -> judges -> writers),
from the project root: ``python tests/data/make_monitors_ckpt.py``. The file is committed so that
``tests/test_monitors_checkpoint.py`` can check that a run checkpointed before the change resumes after it with
its curves and warning records intact. Do not regenerate it with newer code: that would test nothing.

The fit: ``TanhMLP`` (tests/callbacks_helpers.py), the saturating batch, 8 steps of SGD lr 0.1, the four monitors
in a ``CallbackGroup`` logging every 2 steps (saturation warns after 3 logged steps), checkpoint at step 8.
"""

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch, trainer

OUT = Path(__file__).with_name("monitors_v1.ckpt")


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ModelCheckpoint(dirpath=tmp, filename="last", every_n_train_steps=8, save_top_k=1)
        monitors = [
            ActivationMonitor(every_n_steps=2, histogram_every_n_steps=4, saturation_warning=0.2),
            GradientMonitor(every_n_steps=2, histogram_every_n_steps=4),
            ParameterMonitor(every_n_steps=2, histogram_every_n_steps=4),
            UpdateRatioMonitor(every_n_steps=2, high=-1.6, patience=2),
        ]
        t = trainer(Path(tmp), [CallbackGroup(monitors), ckpt], enable_checkpointing=True, max_steps=8)
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 16))
        state = torch.load(Path(tmp) / "last.ckpt", weights_only=False)
    torch.save(state, OUT)
    for key, value in state["callbacks"].items():
        print(key, {k: v for k, v in value.items()} if isinstance(value, dict) else value)


if __name__ == "__main__":
    main()

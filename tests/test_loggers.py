"""Every logger gets what it can show: W&B and MLflow written locally by the real packages and read back with
their own formats, CSV with scalars only; values checked against statistics computed here from the tensors."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from callbacks._writers import Writer, writers_for
from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch, trainer

ROOT = Path(__file__).resolve().parents[1]
LR = 0.1
STEPS = 4


def monitors() -> list:
    """Scalars every step, histograms and figures at step 0, every 2 steps (steps 1 and 3) and at the end."""
    every = {"every_n_steps": 1, "histogram_every_n_steps": 2, "figure_every_n_steps": 2}
    return [ActivationMonitor(**every), UpdateRatioMonitor(every_n_steps=1, figure_every_n_steps=2)]


def reference() -> dict[str, float | np.ndarray]:
    """The tanh layer of ``TanhMLP`` is ``tanh`` of the fixed input: its statistics, computed directly."""
    h = torch.tanh(saturating_batch(16)).double()  # (16, 8), the same on every step
    return {
        "std": h.std().item(),
        "mean": h.mean().item(),
        "saturation": (h.abs() > 0.97).double().mean().item(),
        "values": h.flatten().numpy(),
    }


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: W&B's header, then LevelDB's log format (32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            return
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def _wandb_history(run_dir: Path, timeout: float = 60.0) -> list[dict]:
    """The history rows of a finished offline run.

    ``wandb.finish()`` can return before wandb-core has closed the run's file (under load in CI a test read it with
    no history yet), so this waits for the file's last record, ``exit``.
    """
    path, deadline = next(run_dir.glob("run-*.wandb")), time.monotonic() + timeout
    while not (records := list(_wandb_records(path))) or records[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.2)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def _png_shape(data: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def test_wandb_gets_scalars_histograms_figures_and_summary_table(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ref = reference()
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="monitors")
    t = trainer(tmp_path, monitors(), max_steps=STEPS, logger=logger)
    try:
        t.fit(TanhMLP(LR), fixed_loader(saturating_batch(16), STEPS))
    finally:
        wandb.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    rows = _wandb_history(run_dir)

    def logged(key: str) -> dict[int, object]:
        return {r["trainer/global_step"]: r[key] for r in rows if key in r}

    # scalars on every step, equal to the directly computed statistics
    assert sorted(logged("activation/act/std")) == list(range(STEPS))
    for value in logged("activation/act/std").values():
        assert value == pytest.approx(ref["std"], rel=1e-5)
    assert set(logged("activation/act/saturation").values()) == {ref["saturation"]}
    assert len(logged("update_ratio/head.weight")) == STEPS

    # histograms from the monitor's own bins: at most 64 equal bins covering min to max, holding every value once,
    # exactly what numpy counts between the same edges
    hists = {k: v for k, v in logged("activation/act/_type").items() if v == "histogram"}
    assert sorted(hists) == [0, 1, 3]
    counts, edges = logged("activation/act/values")[3], np.asarray(logged("activation/act/bins")[3])
    assert 32 <= len(counts) <= 64 and len(edges) == len(counts) + 1
    values = ref["values"]
    assert edges[0] <= values.min() and edges[-1] > values.max()
    assert counts == np.histogram(values, bins=edges)[0].tolist() and sum(counts) == values.size

    # figures as images: a PNG per figure step, of the size W&B recorded
    images = {k: v for k, v in logged("activation/distribution/_type").items() if v == "image-file"}
    assert sorted(images) == [0, 1, 3]
    path = run_dir / "files" / logged("activation/distribution/path")[3]
    height, width = _png_shape(path.read_bytes())
    assert (height, width) == (logged("activation/distribution/height")[3], logged("activation/distribution/width")[3])
    assert logged("update_ratio/history/_type")

    # the end-of-fit summary as a table: one row per watched module
    table_path = run_dir / "files" / next(iter(logged("activation/summary/path").values()))
    table = json.loads(table_path.read_text())
    assert table["columns"] == ["layer", "mean", "std", "saturation", "dead"]
    rows_by_layer = {row[0]: row for row in table["data"]}
    assert rows_by_layer["act (Tanh)"][2] == f"{ref['std']:.4f}"
    assert rows_by_layer["act (Tanh)"][3] == f"{ref['saturation']:.2%}"
    assert "relu (ReLU)" in rows_by_layer


def test_mlflow_gets_scalars_figures_and_summary(tmp_path):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    ref = reference()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="monitors", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    t = trainer(tmp_path, monitors(), max_steps=STEPS, logger=logger)
    t.fit(TanhMLP(LR), fixed_loader(saturating_batch(16), STEPS))

    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(logger.run_id, "activation/act/std")
    assert sorted(m.step for m in history) == list(range(STEPS))
    for m in history:
        assert m.value == pytest.approx(ref["std"], rel=1e-5)
    assert {m.value for m in client.get_metric_history(logger.run_id, "activation/act/saturation")} == {
        ref["saturation"]
    }

    # the figures as image artifacts with their step; MLflow has no histogram type (documented)
    images = [Path(a.path).name for a in client.list_artifacts(logger.run_id, "images")]
    pngs = [name for name in images if name.endswith(".png")]
    steps = sorted(int(name.split("+step+")[1].split("+")[0]) for name in pngs if name.startswith("activation_"))
    assert steps == [0, 1, 3]
    local = Path(client.download_artifacts(logger.run_id, f"images/{pngs[0]}", str(tmp_path / "dl")))
    height, width = _png_shape(local.read_bytes())
    assert width == 680 and height > 300

    summary = Path(client.download_artifacts(logger.run_id, "summary/activation_summary.md", str(tmp_path / "dl")))
    text = summary.read_text()
    assert "| act (Tanh) |" in text and f"{ref['std']:.4f}" in text


def test_csv_logger_gets_scalars_only_and_no_figure_is_drawn(tmp_path):
    drawn = []
    monitor = ActivationMonitor(every_n_steps=1, histogram_every_n_steps=2, figure_every_n_steps=2)
    draw = monitor.probe.draw
    monitor.probe.draw = lambda: drawn.append(1) or draw()
    ref = reference()
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    writer = writers_for([logger])[0]
    assert type(writer) is Writer and not writer.histograms and not writer.figures
    t = trainer(tmp_path, [monitor], max_steps=STEPS, logger=logger)
    t.fit(TanhMLP(LR), fixed_loader(saturating_batch(16), STEPS))
    lines = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("activation/act/std")
    values = [float(line.split(",")[column]) for line in lines[1:] if line.split(",")[column]]
    assert len(values) == STEPS and all(v == pytest.approx(ref["std"], rel=1e-5) for v in values)
    assert drawn == []  # nothing would show a figure: none is drawn


def test_one_writer_per_logger_shared_by_all_monitors(tmp_path):
    a, b = CSVLogger(str(tmp_path), name="a"), CSVLogger(str(tmp_path), name="b")
    first, second = writers_for([a, b]), writers_for([a, b])
    assert first[0] is second[0] and first[1] is second[1] and first[0] is not first[1]


def test_callbacks_import_neither_wandb_nor_mlflow(tmp_path):
    """A fit with CSV and TensorBoard loggers never imports wandb or mlflow (they are not dependencies)."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch, trainer
import pathlib
tmp = pathlib.Path({str(tmp_path)!r})
group = CallbackGroup([ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1),
                       ParameterMonitor(every_n_steps=1), UpdateRatioMonitor(every_n_steps=1)])
loggers = [CSVLogger(str(tmp)), TensorBoardLogger(str(tmp))]
trainer(tmp, [group], max_steps=2, logger=loggers).fit(TanhMLP(0.1), fixed_loader(saturating_batch(16), 2))
print(sorted(m for m in ("wandb", "mlflow") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_group_and_tensorboard_layout(tmp_path):
    """Monitors in a group and one passed alone write one merged layout; `activation_grad/*/mean` is gone."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    from tests.callbacks_helpers import read_events

    group = CallbackGroup([ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)])
    t = trainer(tmp_path, [group, ParameterMonitor(every_n_steps=1)], max_steps=2)
    t.fit(TanhMLP(LR), fixed_loader(saturating_batch(16), 2))
    acc = read_events(t.logger.log_dir)
    assert not [tag for tag in acc.Tags()["scalars"] if tag.startswith("activation_grad/") and tag.endswith("/mean")]
    event = acc.Tensors("custom_scalars__config__")[-1]
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    (category,) = layout.category
    titles = [chart.title for chart in category.chart]
    assert titles[:2] == ["loss", "learning rate"]
    assert titles[2].startswith("activation saturation") and titles[-1].startswith("weight grad:data")
    assert any(title.startswith("activation gradient std") for title in titles)
    # every layer's line is in a run of its own (its own colour), under the chart's series tag
    tags = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert tags[titles[2]] == ["^activation/saturation$"]


def test_a_second_fit_with_a_new_logger_gets_its_own_layout(tmp_path):
    from tests.callbacks_helpers import read_events, tb_logger

    monitor = ActivationMonitor(every_n_steps=1)
    for name in ("first", "second"):
        t = trainer(tmp_path, [monitor], max_steps=2, logger=tb_logger(tmp_path, name))
        t.fit(TanhMLP(LR), fixed_loader(saturating_batch(16), 2))
        assert read_events(t.logger.log_dir).Tensors("custom_scalars__config__"), name


def test_the_health_report_reaches_wandb_as_a_table_and_mlflow_as_health_md(tmp_path, monkeypatch):
    """The report of a naive-init classifier: W&B gets a table of its findings, MLflow the markdown as health.md."""
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from mlflow import MlflowClient

    from callbacks import HealthMonitor
    from tests.test_health_monitor import Classifier, _data

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MLFlowLogger(experiment_name="health", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    wb = WandbLogger(offline=True, save_dir=str(tmp_path), project="health")
    monitor = HealthMonitor(every_n_steps=2)
    t = trainer(tmp_path, [monitor], max_steps=4, logger=[wb, mlflow], log_every_n_steps=2)
    try:
        t.fit(Classifier(scale=40.0), _data(4))
    finally:
        wandb.finish()
    findings = monitor.findings
    assert any(f.key == "init/loss" for f in findings)
    # MLflow: the report's markdown, as written
    local = MlflowClient(tracking_uri=uri).download_artifacts(mlflow.run_id, "health.md", str(tmp_path / "dl"))
    assert Path(local).read_text() == monitor.report.text
    # W&B: a table, one row per finding (step, where, finding, fix, look at, kind)
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    rows = [r for r in _wandb_history(run_dir) if "health/report/path" in r]
    table = json.loads((run_dir / "files" / rows[-1]["health/report/path"]).read_text())
    assert table["columns"] == ["step", "where", "finding", "fix", "look at", "kind"]
    assert [row[2] for row in table["data"]] == [f.message for f in sorted(findings, key=lambda f: f.step)]


@pytest.mark.parametrize("prefix", ["", "exp"])
@pytest.mark.parametrize("tested", [True, False], ids=["private_reads_on", "public_path"])
def test_tensorboard_scalars_the_same_with_or_without_the_private_shortcuts(tmp_path, monkeypatch, tested, prefix):
    """The writer's two private reads (`_internals`: a logger's prefix, SummaryWriter's file writer for one event a
    step) give what the public path gives: on an untested torch/Lightning they are off, with the same tags."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks import _internals
    from tests.callbacks_helpers import read_events, scalars

    monkeypatch.setattr(_internals, "TORCH_IS_TESTED", tested)
    monkeypatch.setattr(_internals, "IS_TESTED", tested)
    written = []
    if tested and not prefix:  # the one-event path is the one taken
        one_event = _internals.write_scalars_event
        monkeypatch.setattr("callbacks._writers.write_scalars_event", lambda *a: written.append(1) or one_event(*a))
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0, prefix=prefix, default_hp_metric=False)
    t = trainer(tmp_path, [ActivationMonitor(every_n_steps=1)], max_steps=STEPS, logger=logger)
    t.fit(TanhMLP(LR), fixed_loader(saturating_batch(16), STEPS))
    acc = read_events(t.logger.log_dir)
    ref = reference()
    tag = f"{prefix}-activation/act/std" if prefix else "activation/act/std"  # the logger's prefix, as on self.log
    assert sorted(scalars(acc, tag)) == list(range(STEPS))
    assert all(v == pytest.approx(ref["std"], rel=1e-5) for v in scalars(acc, tag).values())
    assert {t.split("/")[0] for t in acc.Tags()["scalars"]} == {tag.split("/")[0]}
    assert bool(written) == (tested and not prefix)


def test_steady_tensorboard_logger_waits_for_its_writer_at_most_once_a_second(tmp_path):
    """The CLI's default logger: Lightning's `save()` after each logging step flushes (waits for the writer thread)
    only once per `save_every_s`, and the end of the run flushes; TensorBoard reads back every scalar."""
    from lightning_makemore.cli import SteadyTensorBoardLogger
    from tests.callbacks_helpers import read_events, scalars

    logger = SteadyTensorBoardLogger(tmp_path, name="run", version=0, save_every_s=3600.0, default_hp_metric=False)
    flushes = []
    flush = logger.experiment.flush
    logger.experiment.flush = lambda: (flushes.append(1), flush())[1]
    for step in range(5):
        logger.log_metrics({"x": float(step)}, step=step)
        logger.save()
    assert len(flushes) == 1  # the first save only, within the hour
    logger.finalize("success")
    assert len(flushes) >= 2  # the end flushes (and closes)
    assert scalars(read_events(logger.log_dir), "x") == {i: float(i) for i in range(5)}
    assert (Path(logger.log_dir) / "hparams.yaml").is_file()

    every = SteadyTensorBoardLogger(tmp_path, name="run", version=1, save_every_s=0.0)
    flushes.clear()
    flush_every = every.experiment.flush
    every.experiment.flush = lambda: (flushes.append(1), flush_every())[1]
    for _ in range(3):
        every.save()
    assert len(flushes) == 3  # save_every_s=0: Lightning's behaviour, a flush each time


def test_tensorboard_records_checksummed_in_c_are_tensorboards_own_bytes(tmp_path, monkeypatch):
    """`_internals.fast_checksums`: TensorBoard's record framing with google-crc32c's C checksums gives TensorBoard's
    bytes for any payload; a fit's event file, written so, reads back through TensorBoard's reader, which checks
    every record's checksums."""
    import io

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.summary.writer.record_writer import RecordWriter
    from tensorboard.version import VERSION

    from callbacks import _internals
    from tests.callbacks_helpers import read_events, scalars

    masked = _internals._c_masked_crc32c()
    tested = _internals.TENSORBOARD_TESTED[0] <= _internals._minor(VERSION) <= _internals.TENSORBOARD_TESTED[1]
    assert (masked is not None) == tested  # google-crc32c is a dependency: its C code is there
    if masked is None:
        pytest.skip(f"TensorBoard {VERSION} is outside the tested releases: its own checksums are kept")
    rng = np.random.default_rng(0)
    for n in [0, 1, 7, 8, 255, 1024, 3001]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        ours, theirs = io.BytesIO(), io.BytesIO()
        _internals._write_record(ours, masked, data)
        RecordWriter(theirs).write(data)
        assert ours.getvalue() == theirs.getvalue()

    assert not _internals.fast_checksums(object())  # not a SummaryWriter: nothing done
    engaged = []  # what the writer's call returned at each recorded step, with the record writer's own `write`
    fast = _internals.fast_checksums

    def recorded(writer):
        out = fast(writer)
        records = writer._get_file_writer().event_writer._async_writer._writer
        engaged.append((out, "write" in vars(records)))
        return out

    monkeypatch.setattr("callbacks._writers.fast_checksums", recorded)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0, default_hp_metric=False)
    t = trainer(tmp_path, [ActivationMonitor(every_n_steps=1)], max_steps=STEPS, logger=logger)
    t.fit(TanhMLP(LR), fixed_loader(saturating_batch(16), STEPS))
    assert engaged == [(True, True)] * STEPS
    acc = read_events(t.logger.log_dir)
    assert sorted(scalars(acc, "activation/act/std")) == list(range(STEPS))

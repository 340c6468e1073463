"""Peak memory and bytes sent per step: FSDP2's traffic from the shapes, every step row's memory,
and `keel report`'s table and plots of both. The 2-rank runs are checked in
tests/distributed/test_distributed.py (`test_fsdp_run_logs_...`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from keel.config import SFTConfig
from keel.distributed.comm import fsdp_pass_bytes
from keel.report import format_goodput, goodput, plot_resources
from keel.runlog import RunLog, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fsdp_pass_bytes_are_the_padded_shards_gathered_and_the_padded_gradients_scattered():
    # A 2-layer toy on 2 ranks: a root embedding of 5 rows x 4 (odd: FSDP2 pads it to 2 shards of
    # 3 rows), and per layer a 4 x 4 weight and a bias of 3 (padded to 2 shards of 2).
    root, layer = [torch.Size([5, 4])], [torch.Size([4, 4]), torch.Size([3])]
    # Shards per rank: root 3 * 4 = 12 elements, each layer 2 * 4 + 2 = 10.
    # Gathered: the forward 12 + 10 + 10, the backward the layers again 10 + 10 = 52 elements.
    # Scattered: every group's padded full gradient, 2 ranks * (12 + 10 + 10) = 64 elements.
    assert fsdp_pass_bytes(root, [layer, layer], ranks=2) == {"all_gather": 52 * 4, "reduce_scatter": 64 * 4}
    assert fsdp_pass_bytes(root, [layer, layer], ranks=2, param_bytes=2) == {"all_gather": 52 * 2,
                                                                             "reduce_scatter": 64 * 4}  # bf16 compute
    # On 4 ranks: root 2 rows * 4 = 8, a layer 1 * 4 + 1 = 5; gathered 8 + 2 * 2 * 5 = 28,
    # scattered 4 * (8 + 5 + 5) = 72 (the root padded from 5 to 8 rows, a bias from 3 to 4).
    assert fsdp_pass_bytes(root, [layer, layer], ranks=4) == {"all_gather": 28 * 4, "reduce_scatter": 72 * 4}


def write_run(folder: Path, rows: list[dict]) -> Path:
    log = RunLog(folder)
    for row in rows:
        log.metrics(row)
    log.close()
    (folder / "events.jsonl").write_text('{"time": 0.0, "event": "run_start"}\n{"time": 9.0, "event": "run_end"}\n')
    return folder


def test_report_shows_peak_memory_and_mb_sent_per_step_by_purpose_and_plots_them(tmp_path):
    plain = write_run(tmp_path / "plain", [{"stage": "sft", "step": s, "step_s": 1.0, "peak_rss_mb": rss,
                                            "comm_bytes": 0, "comm_s": 0.0} for s, rss in ((1, 500.0), (2, 640.0))])
    text = "\n".join(format_goodput(goodput(plain)))
    assert "stage  steps  peak RSS MB max  peak RSS MB final" in text
    assert "sft        2            640.0              640.0" in text
    assert "MB/step" not in text and "device" not in text  # one CPU process: nothing sent, no accelerator

    fsdp = {"comm_bytes_fsdp": 3_000_000, "comm_bytes_metrics": 400, "comm_bytes_control": 48}
    rows = [{"stage": "rl", "step": s, "step_s": 1.0, "peak_rss_mb": 700.0 + s, "peak_device_mb": mem,
             "comm_bytes": sum(fsdp.values()), "comm_s": 0.1, **fsdp} for s, mem in ((1, 90.0), (2, 120.5), (3, 80.0))]
    ranks = write_run(tmp_path / "ranks", rows)
    g = goodput(ranks)
    assert g["stages"]["rl"]["memory_mb"]["peak_device_mb"] == {"max": 120.5, "final": 80.0}
    assert g["stages"]["rl"]["sent_mb_per_step"] == pytest.approx(
        {"all": 3.000448, "control": 48e-6, "fsdp": 3.0, "metrics": 400e-6})
    lines = format_goodput(g)
    header, line = lines[-2], lines[-1]
    assert header.split("  ")[:2] == ["stage", "steps"] and "device peak MB max" in header
    for column in ("MB/step all", "MB/step control", "MB/step fsdp", "MB/step metrics"):
        assert column in header
    assert line.split() == ["rl", "3", "703.0", "703.0", "120.5", "80.0", "3", "4.8e-05", "3", "0.0004"]
    assert json.loads(json.dumps(g))["stages"] == g["stages"]  # `keel report` prints it as JSON too

    for folder, stage in ((plain, "sft"), (ranks, "rl")):
        paths = plot_resources(folder)
        assert paths == [folder / f"resources_{stage}.png"]
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_training_run_logs_its_peak_memory_in_every_step_row_and_keel_report_shows_it(tmp_path):
    from typer.testing import CliRunner

    from keel.cli import app
    from keel.models import init_model
    from keel.train.sft import sft

    model, tok = init_model("qwen3", layers=1, hidden=32, seed=0)
    cfg = SFTConfig(task="arithmetic", task_options={"digits": 1}, examples=16, steps=2, batch_tokens=128,
                    device="cpu")
    sft(model, tok, cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(row["peak_rss_mb"] > 10 for row in rows)  # MB: torch alone takes more
    assert rows[1]["peak_rss_mb"] >= rows[0]["peak_rss_mb"]  # a high-water mark
    assert "peak_device_mb" not in rows[0]  # on a CPU

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "peak RSS MB max" in result.output and f"{max(r['peak_rss_mb'] for r in rows):.1f}" in result.output
    assert (tmp_path / "resources_sft.png").is_file()

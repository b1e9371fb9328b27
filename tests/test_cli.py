"""Every tool's start: help text first, no warnings, no colour codes in logs; a tiny real run
writes metrics, TensorBoard events, plots, named exports and results with provenance."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

from tests.helpers import CONFIGS, NARROW_RESNET, REPO

import pytest

TOOLS = ["train_bissl", "finetune_det", "pretrain_ssl", "eval_cls", "aggregate_seeds",
         "compare_runs", "inspect_dataset", "convert_checkpoint", "submit", "search"]  # fmt: skip
# As a user starts them (Python's default warning filters).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ANSI = "\x1b["


@pytest.mark.parametrize("tool", [*TOOLS, "run_demo"])
def test_help_says_what_and_how_first(tool, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"tools/{tool}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "tools" / f"{tool}.py"), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    # After the usage lines and before the options: what the tool does, then an example.
    what = out.split("\n\n")[1]
    assert not what.startswith(" ") and len(what) > 20, tool
    head = out[out.index(what) :].split("positional arguments:")[0].split("options:")[0]
    assert f"python tools/{tool}.py" in head, (tool, head)
    assert "train_net.py" not in out  # detectron2's own examples are replaced


@pytest.mark.e2e  # a tool in another process
def test_start_prints_no_warning():
    """torch.jit's FutureWarning printed twice on every start (fvcore, detectron2 imports)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_bissl.py"), "--help"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stdout + done.stderr and ANSI not in done.stdout + done.stderr
    # Only those import-time calls are silenced: user code still hears torch's deprecation.
    probe = (
        "import bissl_det, torch, warnings; warnings.simplefilter('always'); "
        "torch.jit.script(lambda x: x + 1)"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True)
    assert "torch.jit.script` is deprecated" in done.stderr


@pytest.mark.e2e  # a tool in another process
def test_no_cuda_runtime_line_on_a_cpu_machine(tmp_path):
    """torch's cpp_extension logs "No CUDA runtime is found" at import when a CUDA toolkit
    folder exists without a GPU; a tool run imports it through detectron2's environment report."""
    env = {**ENV, "CUDA_HOME": str(tmp_path)}  # an existing folder: torch believes a toolkit
    probe = "import torch.utils.cpp_extension, logging; {}"
    loud = subprocess.run(
        [sys.executable, "-c", probe.format("logging.getLogger('torch.utils.cpp_extension')"
         ".warning('kept')")], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if "No CUDA runtime is found" not in loud.stderr:
        pytest.skip("this torch sees a CUDA runtime: it does not log the line")
    quiet = subprocess.run(
        [sys.executable, "-c", "import bissl_det; " + probe.format(
            "logging.getLogger('torch.utils.cpp_extension').warning('kept')")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert "No CUDA runtime" not in quiet.stderr
    assert "kept" in quiet.stderr  # the logger's other warnings still show


@pytest.mark.slow
def test_tiny_run_writes_every_output_plain(in_demo_workdir, tmp_path):
    out = tmp_path / "pretrain"
    command = [
        sys.executable, str(REPO / "tools" / "pretrain_ssl.py"),
        "--config-file", str(CONFIGS / "quick" / "pretrain_simclr_demo.yaml"),
        *NARROW_RESNET,
        "MODEL.SIMCLR.PROJECTOR_DIMS", "[32, 16]", "BISSL.PRETEXT_DATA.AUG.CROP_SIZE", "32",
        "PRETRAIN.IMS_PER_BATCH", "8", "PRETRAIN.WARMUP_STEPS", "1", "PRETRAIN.LOG_PERIOD", "1",
        "PRETRAIN.ITERS", "2", "PRETRAIN.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    with open(tmp_path / "console.txt", "w") as console:  # redirected, as on a cluster
        done = subprocess.run(command, stdout=console, stderr=subprocess.STDOUT, env=ENV)
    printed = (tmp_path / "console.txt").read_text()
    assert done.returncode == 0, printed[-3000:]
    log = (out / "log.txt").read_text()
    assert "Full config saved to" in log and "pretext_loss" in printed
    assert ANSI not in log and ANSI not in printed
    assert "Warning" not in printed
    # Outputs of every tool: metrics.json, TensorBoard events, plots.
    assert len((out / "metrics.json").read_text().splitlines()) >= 2
    assert list(out.glob("events.out.tfevents.*"))
    assert (out / "plots" / "pretext_loss.png").is_file() and (out / "plots" / "lr.png").is_file()
    # The periodic export says which step it holds; the final one exists after success.
    assert (out / "pretext_backbone_iter1.pth").is_file()
    assert (out / "pretext_backbone.pth").is_file()
    assert not list(out.glob("*_last*.pth"))
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["final_pretext_loss"] > 0
    assert "SimCLR: nats" in results["units"]["final_pretext_loss"]
    prov = results["provenance"]
    assert prov["config_file"]["path"].endswith("pretrain_simclr_demo.yaml")
    assert len(prov["config_file"]["sha256"]) == 64 and len(prov["config"]["sha256"]) == 64
    assert prov["seed"] == 0 and prov["data"]["pretext"]["datasets"] == ["demo_voc_trainval"]
    assert prov["data"]["train"] == {"demo_voc_trainval": 24}
    assert prov["start_time"] <= prov["end_time"]

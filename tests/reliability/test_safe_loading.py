"""No file a tool reads can run code: malicious pickles given as weights, converter input, resume
checkpoint, search storage or config are refused by real tool processes, naming the file, and
no marker file appears. Earlier outputs survive byte for byte."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.checkpoint import UntrustedCheckpointError, load_checkpoint_file
from tests.helpers import REPO, TINY_C4

import numpy as np
import pytest
import torch

from .runs import run

TOOLS = REPO / "tools"
CONFIGS = REPO / "configs" / "quick"
TINY_FINETUNE = CONFIGS / "test_tiny_finetune_C4.yaml"
CLS_DEMO = CONFIGS / "cls_demo.yaml"
TIMEOUT = 240


class _Plant:
    """Unpickling this creates ``marker`` (via os.system): the code a hostile file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(path: Path, marker: Path) -> Path:
    """A checkpoint-looking pickle whose loading would create ``marker``."""
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": _Plant(marker)}, "__author__": "x"}, f)
    return path


def malicious_torch_file(path: Path, marker: Path) -> Path:
    """A torch.save zip file holding the same object (only a full unpickle would run it)."""
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Plant(marker)}, path)
    return path


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (lock and log files excepted)."""
    skip = {".run.lock", "log.txt"}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def survived(before: dict[str, str], folder: Path) -> None:
    """Every file listed in ``before`` is still in ``folder``, byte for byte."""
    after = digests(folder)
    assert {k: after.get(k) for k in before} == before


def refused(done, path: Path, marker: Path) -> None:
    """Exit code non-zero, the output names ``path``, and nothing ran."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert str(path) in output, output[-3000:]
    assert not marker.exists(), f"{marker} was created: code in {path} ran"


def tool(name: str, *args: str) -> list[str]:
    return [sys.executable, str(TOOLS / name), *args]


# ---- The one reader ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_model_zoo_pickles_of_arrays_still_load(tmp_path, protocol):
    path = tmp_path / "zoo.pkl"
    arrays = {"res2.0.conv1.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "zoo", "steps": [1, 2.5, "x"]}, f, protocol)
    loaded = load_checkpoint_file(path)
    assert np.array_equal(loaded["model"]["res2.0.conv1.weight"], arrays["res2.0.conv1.weight"])
    assert loaded["steps"] == [1, 2.5, "x"]


def test_reader_refuses_code_in_a_pickle_unless_trusted(tmp_path, caplog):
    marker = tmp_path / "MARKER"
    path = malicious_pickle(tmp_path / "evil.pkl", marker)
    with pytest.raises(UntrustedCheckpointError, match=rf"{path}.*posix\.system"):
        load_checkpoint_file(path)
    assert not marker.exists()
    with caplog.at_level("WARNING"):
        load_checkpoint_file(path, trust_pickle=True)  # the explicit opt-in does run it
    assert marker.exists() and "trust_pickle=True" in caplog.text


# ---- Real tool processes -------------------------------------------------------------------------


PRETRAIN = (
    "pretrain_ssl.py",
    CONFIGS / "pretrain_simclr_demo.yaml",
    ("PRETRAIN.IMS_PER_BATCH", "8"),
)


@pytest.mark.e2e  # a tool in another process
@pytest.mark.parametrize(
    "kind, script, config, opts",
    [
        ("pkl", "finetune_det.py", TINY_FINETUNE, ()),
        ("pkl", "train_bissl.py", TINY_C4, ()),
        ("pkl", "eval_cls.py", CLS_DEMO, ()),
        ("pkl", *PRETRAIN),
        ("pth", "finetune_det.py", TINY_FINETUNE, ()),  # .pth: the same reader, torch's format
        ("pth", "eval_cls.py", CLS_DEMO, ()),
    ],
)
def test_malicious_weights_are_refused_by_every_tool(
    demo_workdir, tmp_path, kind, script, config, opts
):
    marker = tmp_path / "MARKER"
    make = malicious_pickle if kind == "pkl" else malicious_torch_file
    weights = make(tmp_path / f"weights.{kind}", marker)
    out = tmp_path / "out"
    done = run(
        tool(script, "--config-file", str(config), "MODEL.WEIGHTS", str(weights), *opts)
        + ["OUTPUT_DIR", str(out)],
        demo_workdir,
        TIMEOUT,
    )
    refused(done, weights, marker)
    assert not (out / "model_final.pth").exists()


@pytest.mark.e2e  # a tool in another process
def test_converter_refuses_a_malicious_pickle_without_trust(tmp_path):
    marker = tmp_path / "MARKER"
    source = malicious_pickle(tmp_path / "zoo.pkl", marker)
    output = tmp_path / "converted.pth"
    done = run(tool("convert_checkpoint.py", str(source), str(output)), tmp_path, TIMEOUT)
    refused(done, source, marker)
    assert "--trust-pickle" in done.stderr and not output.exists()


@pytest.mark.e2e  # a tool in another process
@pytest.mark.parametrize("planted", ["evil.pkl", "model_final.pth"])
def test_resume_refuses_a_planted_last_checkpoint(demo_workdir, tmp_path, planted):
    marker = tmp_path / "MARKER"
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"iteration": 1}\n')  # an earlier output that must survive
    path = malicious_pickle(out / planted, marker)
    (out / "last_checkpoint").write_text(planted)
    before = digests(out)
    done = run(
        tool("finetune_det.py", "--config-file", str(TINY_FINETUNE), "--resume")
        + ["OUTPUT_DIR", str(out)],
        demo_workdir,
        TIMEOUT,
    )
    refused(done, path, marker)
    survived(before, out)


@pytest.mark.e2e  # a tool in another process
def test_search_refuses_a_storage_that_is_not_a_journal(demo_workdir, tmp_path):
    marker = tmp_path / "MARKER"
    storage = malicious_pickle(tmp_path / "study.journal", marker)
    before = digests(tmp_path)
    done = run(
        tool("search.py", "--config-file", str(CLS_DEMO), "--trials", "1", "--linear-probe")
        + ["--storage", str(storage), "OUTPUT_DIR", str(tmp_path / "search")],
        demo_workdir,
        TIMEOUT,
    )
    refused(done, storage, marker)
    assert "not an Optuna journal" in done.stdout + done.stderr
    survived(before, tmp_path)


@pytest.mark.e2e  # a tool in another process
def test_config_with_a_python_tag_is_refused(demo_workdir, tmp_path):
    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f'_BASE_: "{TINY_FINETUNE}"\nSEED: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    done = run(
        tool("finetune_det.py", "--config-file", str(config), "OUTPUT_DIR", str(tmp_path / "o")),
        demo_workdir,
        TIMEOUT,
    )
    refused(done, config, marker)

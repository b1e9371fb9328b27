"""Start-up work done on rank 0 only and shared: its result, or its error, on every rank."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str, images: str) -> None:
    from bissl_det.utils.rank_zero import RankZeroError, on_rank_zero

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out = Path(out_dir)
    record: dict = {}
    try:

        def work() -> list[int]:
            (out / f"worked{rank}").write_text("1")
            return [7, rank]

        record["result"] = on_rank_zero(work, "the work")

        def failing() -> None:
            raise ValueError("bad data in images/x.png")

        try:
            on_rank_zero(failing, "checking the data")
        except (ValueError, RankZeroError) as e:
            record["error"] = f"{type(e).__name__}: {e}"

        from bissl_det.config.defaults import add_bissl_config
        from bissl_det.data.build import pretext_image_paths

        from detectron2.config import get_cfg

        cfg = add_bissl_config(get_cfg())
        cfg.BISSL.PRETEXT_DATA.IMAGE_ROOTS = [images]
        cfg.BISSL.PRETEXT_DATA.DATASETS = []
        paths = pretext_image_paths(cfg)
        record["paths"] = [os.fsdecode(p) for p in paths.tolist()]
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        dist.destroy_process_group()


@pytest.mark.dist
def test_rank_zero_works_alone_and_shares_result_and_error(tmp_path):
    images = tmp_path / "images"
    for name in ("c/1.png", "a/2.jpg", "b.jpeg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(b"")
    args = (str(tmp_path / "init"), str(tmp_path), str(images))
    mp.start_processes(_worker, args=args, nprocs=WORLD, start_method="spawn")
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert (tmp_path / "worked0").exists() and not (tmp_path / "worked1").exists()
    assert records[0]["result"] == records[1]["result"] == [7, 0]
    assert records[0]["error"] == "ValueError: bad data in images/x.png"
    assert records[1]["error"] == (
        "RankZeroError: checking the data failed on rank 0: ValueError: bad data in images/x.png"
    )
    expected = [str(images / n) for n in ("a/2.jpg", "b.jpeg", "c/1.png")]
    assert records[0]["paths"] == records[1]["paths"] == expected

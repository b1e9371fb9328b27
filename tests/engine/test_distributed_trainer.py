"""The trainer's hand-made all-reduces: 2 gloo processes x batch B/2 == 1 process x batch B.

A norm-free toy BiSSL model (BN would make per-process batches differ) runs the trainer's own
lower step, stage system (Hessian, Gauss-Newton or Fisher) and upper step; SimCLR's loss is global
through the gather.
"""

import os
from collections import OrderedDict

from bissl_det.config.defaults import add_bissl_config
from bissl_det.engine import BilevelTrainer
from bissl_det.modeling.meta_arch import BiSSL
from bissl_det.modeling.pretext.simclr import nt_xent_logits

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from torch import nn

BATCH = 8


def _trunk() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(stem=nn.Linear(6, 5), act=nn.Tanh(), res2=nn.Linear(5, 4), out=nn.Tanh())
    )


class ToyLower(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.resnet = _trunk()
        self.head = nn.Linear(4, 3)

    def head_parameters(self):
        return self.head.parameters()

    def ggn_outputs(self, v1, v2):
        z1, z2 = self.head(self.encoder.resnet(v1)), self.head(self.encoder.resnet(v2))
        logits, positives = nt_xent_logits(z1, z2, temperature=0.5, gather=True)
        return logits, lambda outputs: F.cross_entropy(outputs, positives)

    def forward(self, v1, v2):
        outputs, loss_of_outputs = self.ggn_outputs(v1, v2)
        return loss_of_outputs(outputs)


class ToyUpper(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _trunk()
        self.linear = nn.Linear(4, 3)

    def forward(self, batch):
        logits = self.linear(self.backbone(batch["images"]))
        return {"loss_cls": F.cross_entropy(logits, batch["targets"])}


def _data():
    g = torch.Generator().manual_seed(0)
    pretext = [(torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 6, generator=g))
               for _ in range(2)]  # fmt: skip
    downstream = {"images": torch.randn(BATCH, 6, generator=g),
                  "targets": torch.randint(0, 3, (BATCH,), generator=g)}  # fmt: skip
    return pretext, downstream


def _run(output_dir: str, rank: int, world: int, curvature: str) -> dict[str, torch.Tensor]:
    """One lower step, the stage's system and one upper step on this process's share.

    Each rank is seeded as the tools seed it (SEED + rank): its random initialisation differs,
    and the trainer's start-up broadcast gives every rank rank 0's (= the 1-process run's)."""
    torch.manual_seed(0 + rank)
    model = BiSSL(lower=ToyLower(), upper=ToyUpper())
    cfg = add_bissl_config(get_cfg())
    cfg.OUTPUT_DIR = output_dir
    cfg.BISSL.LOWER.CLIP_GRAD_NORM = cfg.BISSL.UPPER.CLIP_GRAD_NORM = 0.0
    cfg.BISSL.LAMBDA, cfg.BISSL.HYPERGRAD.DAMPING = 0.5, 0.0
    cfg.BISSL.LOWER.WARMUP_STEPS = 0
    cfg.BISSL.HYPERGRAD.CURVATURE = curvature
    trainer = BilevelTrainer(cfg, model=model)
    trainer.resume_or_load(resume=False)  # empty MODEL.WEIGHTS: theta copied to phi, broadcast
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    pretext, downstream = _data()
    trainer._pretext_iter = iter([(v1[share], v2[share]) for v1, v2 in pretext])
    trainer._downstream_iter = iter([{k: v[share] for k, v in downstream.items()}])
    trainer.iter = 0
    with EventStorage() as storage:
        trainer.storage = storage
        lower_loss, _ = trainer.lower_step(0)
        system = trainer.stage_system()
        stats = trainer.upper_step(system, 0)
        system.release()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"grad.{n}": p.grad.clone() for n, p in model.upper.named_parameters()})
    state["lower_loss"] = torch.tensor(lower_loss)
    for key in ("hypergrad_rel_residual", "hypergrad_cosine", "hypergrad_norm_ratio"):
        state[key] = torch.tensor(stats[key])
    return state


def _worker(rank, world, init_file, out_dir, curvature):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = _run(os.path.join(out_dir, f"rank{rank}"), rank, world, curvature)
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_two_processes_match_one(tmp_path, curvature):
    os.makedirs(tmp_path / "single")
    single = _run(str(tmp_path / "single"), 0, 1, curvature)
    for r in range(2):
        os.makedirs(tmp_path / f"rank{r}")
    args = (2, str(tmp_path / "init"), str(tmp_path), curvature)
    mp.start_processes(_worker, args=args, nprocs=2, start_method="spawn")
    for r in range(2):
        multi = torch.load(tmp_path / f"result{r}.pt", weights_only=True)
        # lower_loss is each process's share of the global SimCLR loss; the rest is global.
        for key, value in single.items():
            if key == "lower_loss":
                continue
            torch.testing.assert_close(multi[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The phi gradient carries the implicit gradient: it moved the upper backbone.
    assert single["grad.backbone.stem.weight"].abs().sum() > 0

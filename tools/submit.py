#!/usr/bin/env python
r"""Submit any tool as a Slurm job (submitit), requeued with --resume after preemption.

    python tools/submit.py train_bissl --config-file configs/bissl/simclr_R50_C4_voc.yaml \
        MODEL.WEIGHTS output/pretrain_simclr/pretext_backbone.pth OUTPUT_DIR output/bissl_voc \
        --nodes 2 --gpus-per-node 8 --partition gpu --time 2880

TOOL is a name in tools/ (train_bissl, finetune_det, pretrain_ssl, eval_cls, ...); every
argument this script does not know goes to the tool. One task per node starts the tool with
--num-gpus G --num-machines N --machine-rank <node> --dist-url tcp://<node 0>:<port>, and the
tool's launcher starts the node's G processes. Before the time limit or on preemption,
submitit's SIGUSR2 makes the tool stop at a step boundary with a checkpoint (SIGUSR1), and the
job is requeued with --resume (bissl_det/utils/cluster.py documents the order of signals).
Where Slurm is not installed the job runs locally (same path; --cluster local|debug forces it).
Prints the job id and where its logs are (--job-dir, default output/jobs).
"""

from __future__ import annotations

import argparse

from bissl_det.utils.cli import describe
from bissl_det.utils.cluster import ToolJob, build_executor

# Seconds between submitit's signal and the kill: the tool's last step and checkpoint fit in.
SIGNAL_DELAY_S = 180


def build_parser() -> argparse.ArgumentParser:
    parser = describe(argparse.ArgumentParser(allow_abbrev=False), __doc__)
    parser.add_argument("tool", help="tool name in tools/ (e.g. train_bissl)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit, minutes")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per node (data loading)")
    parser.add_argument("--mem", type=int, metavar="GB", help="memory per node, GB")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--qos", help="Slurm quality of service")
    parser.add_argument("--job-dir", default="output/jobs", help="submitit logs and pickles")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), help="default: auto")
    parser.add_argument("--wait", action="store_true", help="wait for the job and its result")
    return parser


def main(argv: list[str] | None = None):
    args, tool_args = build_parser().parse_known_args(argv)
    for key in ("nodes", "gpus_per_node", "time"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")
    try:
        job_fn = ToolJob(args.tool, tool_args, args.gpus_per_node, stop_grace_s=SIGNAL_DELAY_S - 30)
        job_fn.command(args.nodes, 0, "localhost", "0")  # refuse bad combinations now
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    executor = build_executor(
        args.job_dir,
        args.nodes,
        args.gpus_per_node,
        args.time,
        cluster=args.cluster,
        partition=args.partition,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem,
        account=args.account,
        qos=args.qos,
        signal_delay_s=SIGNAL_DELAY_S,
        name=f"bissl_det-{job_fn.tool}",
    )
    job = executor.submit(job_fn)
    where = f"{executor.cluster}; logs in {job.paths.folder}"
    print(f"submitted {job_fn.tool} as job {job.job_id} ({where})")
    if args.wait:
        print(f"job {job.job_id} finished: {job.result()}")
    return job


if __name__ == "__main__":
    main()

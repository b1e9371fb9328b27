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
job is requeued with --resume (bissl_det/runtime/cluster.py documents the order of signals).
Where Slurm is not installed the job runs locally (same path; --cluster local|debug forces it).
Prints the job id and where its logs are (--job-dir, default output/jobs).

Before anything is submitted, the tool's config is loaded and checked here, as the tool's own
start-up would (values, data sets, batch sizes for nodes x GPUs processes): a bad config exits
non-zero naming the key. --skip-data-check checks the config's values only (data sets that
only the compute nodes can read). --cpus-per-task defaults to GPUs per node x (loader workers
+ 1), --mem to GPUs per node x (8 GB + 2 GB per loader worker); see docs/many_gpus.md.
"""

from __future__ import annotations

import argparse

from bissl_det.runtime.cluster import (
    ToolJob,
    build_executor,
    default_resources,
    loader_workers,
)
from bissl_det.utils.cli import describe

# Seconds between submitit's signal and the kill: the tool's last step and checkpoint fit in.
SIGNAL_DELAY_S = 180


def build_parser() -> argparse.ArgumentParser:
    parser = describe(argparse.ArgumentParser(allow_abbrev=False), __doc__)
    parser.add_argument("tool", help="tool name in tools/ (e.g. train_bissl)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit, minutes")
    parser.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPU cores per node (default: GPUs per node x (loader workers + 1))",
    )
    parser.add_argument(
        "--mem",
        type=int,
        metavar="GB",
        help="memory per node, GB (default: GPUs per node x (8 + 2 x loader workers))",
    )
    parser.add_argument(
        "--skip-data-check",
        action="store_true",
        help="check only the config's values here (the data is on the compute nodes only)",
    )
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
    for key in ("cpus_per_task", "mem"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")
    cfg = check_tool_config(job_fn.tool, tool_args, args.nodes * args.gpus_per_node, args)
    workers = loader_workers(cfg, job_fn.tool) if cfg is not None else 0
    resources = default_resources(args.gpus_per_node, workers)
    cpus = args.cpus_per_task or resources["cpus_per_task"]
    mem_gb = args.mem or resources["mem_gb"]
    print(f"[submit] {cpus} CPUs and {mem_gb} GB per node ({workers} loader workers per GPU)")
    executor = build_executor(
        args.job_dir,
        args.nodes,
        args.gpus_per_node,
        args.time,
        cluster=args.cluster,
        partition=args.partition,
        cpus_per_task=cpus,
        mem_gb=mem_gb,
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


def check_tool_config(tool: str, tool_args: list[str], world_size: int, args):
    """The tool's config, checked as its start-up checks it, or None (a tool without one).

    Exits non-zero (nothing is submitted) with the check's error, which names the key.
    """
    from bissl_det.config.hypergrad import check_hypergrad_config
    from bissl_det.runtime.setup import checked_config, load_config

    from detectron2.engine import default_argument_parser

    tool_parsed, _ = default_argument_parser().parse_known_args(tool_args)
    if not tool_parsed.config_file:
        return None
    try:
        if args.skip_data_check:
            cfg = load_config(tool_parsed.config_file, tool_parsed.opts)
            check_hypergrad_config(cfg.BISSL.HYPERGRAD)
            return cfg
        return checked_config(tool_parsed, tool, world_size)[0]
    except Exception as e:  # any error the job would meet at start-up: do not submit it
        raise SystemExit(
            f"error: tools/{tool}.py's config fails its start-up checks; nothing was "
            f"submitted:\n{type(e).__name__}: {e}"
        ) from None


if __name__ == "__main__":
    main()

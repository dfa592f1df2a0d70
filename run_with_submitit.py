# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Run main_dino.py (or main_distill.py, eval_linear.py, eval_segmentation.py, eval_knn.py, extract_features.py) on
SLURM with submitit.

    python run_with_submitit.py --nodes 2 --ngpus 8 --arch vit_small --data_path /path/to/imagenet/train \\
        --job_dir /checkpoint/$USER/dino/%j
    python run_with_submitit.py --ngpus 0 --nodes 1 --tasks_per_node 2 --cpus_per_task 1 --partition debug \\
        --job_dir runs/slurm_cpu --data_path synthetic --epochs 2

Every flag that is not one of this file's is the script's, and is checked by the script's own parser (and
its flag checks) before anything is submitted. Each task starts torch.distributed from the SLURM variables
(utils.init_distributed_mode: NCCL with GPUs, gloo without).

Timeouts and preemption: SLURM sends SIGUSR2 `--signal_delay_s` seconds before the time limit (and a
preempting scheduler sends it too, e.g. `scancel --signal=USR2 JOBID`). Every rank finishes its iteration,
they agree on the same step, rank 0 writes output_dir/checkpoint.pth with the exact position inside the
epoch, and the job is requeued through submitit (`Trainer.checkpoint`); the requeued job resumes at the
next iteration with the same samples and augmentations. A plain SIGTERM (scancel) checkpoints the same way
and ends the job without requeueing.
"""
import argparse
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import List, Tuple

import runtime
import utils

# script -> (module, the function that runs it)
SCRIPTS = {
    "main_dino.py": ("main_dino", "train_dino"),
    "main_distill.py": ("main_distill", "train_distill"),
    "eval_linear.py": ("eval_linear", "eval_linear"),
    "eval_segmentation.py": ("eval_segmentation", "eval_segmentation"),
    "eval_knn.py": ("eval_knn", "eval_knn"),
    "extract_features.py": ("extract_features", "extract_features"),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Submitit for DINO", add_help=False)
    parser.add_argument("--script", default="main_dino.py", choices=sorted(SCRIPTS),
                        help="The script to run; its flags follow (see `python SCRIPT --help`).")
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs per node (0: a CPU job, gloo backend).")
    parser.add_argument("--nodes", default=2, type=int, help="Number of nodes to request.")
    parser.add_argument("--timeout", default=2800, type=int, help="Duration of the job, in minutes.")
    parser.add_argument("--job_dir", default="", type=str, help="""Folder of the job's logs, and of the script's
        outputs unless --output_dir is given. `%%j` is replaced by the job id.""")
    parser.add_argument("--partition", default="learnfair", type=str, help="Partition where to submit.")
    parser.add_argument("--use_volta32", action="store_true", help="Request 32G V100 GPUs.")
    parser.add_argument("--comment", default="", type=str, help="Comment to pass to the scheduler.")
    parser.add_argument("--tasks_per_node", default=None, type=int, help="""Processes per node (default: --ngpus,
        or 1 for a CPU job).""")
    parser.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per process (data workers too).")
    parser.add_argument("--mem_gb", default=None, type=int, help="""Memory per node in GB (default: 40 per GPU;
        a CPU job: the partition's default).""")
    parser.add_argument("--account", default="", type=str, help="SLURM account to charge.")
    parser.add_argument("--qos", default="", type=str, help="SLURM quality of service.")
    parser.add_argument("--constraint", default="", type=str, help="SLURM node features, e.g. 'volta32gb'.")
    parser.add_argument("--exclude", default="", type=str, help="Nodes not to use, e.g. 'node[01-03]'.")
    parser.add_argument("--signal_delay_s", default=120, type=int, help="""Seconds before the time limit at which
        the job is told to checkpoint and requeue (SIGUSR2).""")
    parser.add_argument("--max_num_timeout", default=30, type=int, help="How many times the job may be requeued "
                        "after reaching its time limit.")
    return parser


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, argparse.Namespace]:
    """(this file's flags, the script's flags), the latter parsed and checked by the script itself."""
    own_parser = get_args_parser()
    help_requested = any(a in ("-h", "--help") for a in argv)
    own, rest = own_parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    module_name, _ = SCRIPTS[own.script]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(f"run_with_submitit.py --script {own.script}",
                                     parents=[own_parser, module.get_args_parser()])
    if help_requested:
        parser.print_help()
        sys.exit(0)
    args = parser.parse_args(rest + ["--script", own.script])  # exits with the script's usage on a bad flag
    for name in vars(own):
        delattr(args, name)
    if hasattr(module, "check_args"):
        module.check_args(args)
    return own, args


def resolve_dirs(own: argparse.Namespace, args: argparse.Namespace) -> None:
    """--job_dir holds submitit's logs; the script writes to --output_dir, or to --job_dir when the script's
    output folder was left at its default."""
    default_output = get_script_default(own.script, "output_dir")
    if not own.job_dir:
        if getattr(args, "output_dir", default_output) in (default_output, None, ""):
            raise utils.UserError("give --job_dir (where the job writes its logs and outputs; %j is the job id)")
        own.job_dir = args.output_dir
    if hasattr(args, "output_dir") and args.output_dir == default_output:
        args.output_dir = own.job_dir


def get_script_default(script: str, name: str):
    module = importlib.import_module(SCRIPTS[script][0])
    return module.get_args_parser().get_default(name)


class Trainer:
    """The submitted callable: runs the script in each task; `checkpoint()` is submitit's requeue hook."""

    def __init__(self, script: str, args: argparse.Namespace):
        self.script = script
        self.args = args

    def __call__(self):
        import submitit
        job_env = submitit.JobEnvironment()
        args = argparse.Namespace(**vars(self.args))
        for name in ("output_dir", "dump_features"):
            if isinstance(getattr(args, name, None), str):
                setattr(args, name, getattr(args, name).replace("%j", str(job_env.job_id)))
        # Without CPU binding, every task would start as many threads as the node has cores.
        threads = os.environ.get("SLURM_CPUS_PER_TASK", "")
        if threads.isdigit() and "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = threads
            import torch
            torch.set_num_threads(int(threads))
        print(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}, job {job_env.job_id} "
              f"on {job_env.hostname}", flush=True)
        module_name, main_name = SCRIPTS[self.script]
        main = getattr(importlib.import_module(module_name), main_name)
        try:
            result = main(args)
            runtime.barrier()  # every task reaches the end before any leaves, as in runtime.run_script
            runtime.leave_without_finalization_at_exit()
            return result
        except utils.UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise
        except utils.TrainingInterrupted as e:
            print(e, flush=True)
            if callable(e.previous_handler) and e.signum != signal.SIGTERM:
                # submitit's handler: on rank 0, `checkpoint()` below, requeue the job and exit
                e.previous_handler(e.signum, None)
            sys.exit(128 + e.signum)

    def checkpoint(self):
        """Called by submitit on rank 0 when the job is preempted or times out, after training has
        written its checkpoint: the same job again, which resumes from output_dir/checkpoint.pth."""
        import submitit
        print(f"Requeuing {self.script} (resumes from its checkpoint)", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.script, self.args))


def main(argv: List[str]) -> None:
    own, args = parse_args(argv)
    resolve_dirs(own, args)
    import submitit
    if "%j" not in own.job_dir:
        Path(own.job_dir).mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=own.job_dir, slurm_max_num_timeout=own.max_num_timeout)
    if executor.cluster != "slurm":
        raise utils.UserError("no SLURM found here (sbatch is not on the PATH): run the script directly, e.g. "
                              f"`torchrun --nproc_per_node=N {own.script} ...`")
    tasks_per_node = own.tasks_per_node or max(own.ngpus, 1)
    kwargs = {}
    if own.ngpus > 0:
        kwargs["gpus_per_node"] = own.ngpus
    mem_gb = own.mem_gb if own.mem_gb is not None else (40 * own.ngpus if own.ngpus > 0 else None)
    if mem_gb:
        kwargs["mem_gb"] = mem_gb
    constraint = ",".join(c for c in (own.constraint, "volta32gb" if own.use_volta32 else "") if c)
    for key, value in (("slurm_constraint", constraint), ("slurm_comment", own.comment),
                       ("slurm_account", own.account), ("slurm_qos", own.qos), ("slurm_exclude", own.exclude)):
        if value:
            kwargs[key] = value
    # The job unpickles Trainer and imports the scripts: it needs this folder on its path, wherever it runs.
    repo = os.path.dirname(os.path.abspath(__file__))
    kwargs["slurm_setup"] = [f'export PYTHONPATH="{repo}${{PYTHONPATH:+:$PYTHONPATH}}"']
    # A task that dies ends the job step at once: the others would otherwise wait in their next collective
    # until --dist_timeout (a crash that no rank could agree on beforehand, e.g. out of memory).
    kwargs["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    executor.update_parameters(tasks_per_node=tasks_per_node, cpus_per_task=own.cpus_per_task, nodes=own.nodes,
                               timeout_min=own.timeout, slurm_partition=own.partition,
                               slurm_signal_delay_s=own.signal_delay_s, name=Path(own.script).stem, **kwargs)
    try:
        job = executor.submit(Trainer(own.script, args))
    except submitit.core.utils.FailedJobError as e:
        raise utils.UserError(f"sbatch refused the job: {' '.join(str(e).split())}") from None
    job_dir = own.job_dir.replace("%j", str(job.job_id))
    output_dir = getattr(args, "output_dir", job_dir).replace("%j", str(job.job_id))
    print(f"Submitted job_id: {job.job_id}")
    print(f"Logs and checkpoints will be saved at: {output_dir}")
    print(f"Job logs (one per task): {job_dir}/{job.job_id}_<task>_log.out and .err")
    print(f"Follow it with: squeue -j {job.job_id}; tail -f {job_dir}/{job.job_id}_0_log.out")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except utils.UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)

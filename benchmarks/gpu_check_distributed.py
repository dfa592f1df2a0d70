# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Part 2 of the GPU validation kit (benchmarks/gpu_check.py): part_distributed runs
`torchrun --nproc_per_node=1` (2 on CPU) of dist_worker, which the kit's hidden `--_worker dist` option calls in
each rank, and turns the ranks' results into rows of the table."""
import argparse
import json
import os
import sys

import torch

from gpu_check_common import Budget, Report, fp32_reference, rel_err, run_logged, verdict

# the script that torchrun starts in each rank: the kit's driver, whose `--_worker dist` runs dist_worker
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check.py")


def dist_worker(out_dir: str) -> None:
    """Under torchrun: NCCL (gloo on CPU) collectives, the DINO centre, SyncBatchNorm in DDP, a DDP step with the
    fused AdamW, chunked gathering, collective errors. Writes OUT_DIR/dist_rank{r}.json."""
    import torch.distributed as dist
    import torch.nn as nn
    import backbones
    import runtime
    import main_dino
    import utils
    import vision_transformer as vits
    from losses import DINOLoss
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and os.environ.get("GPU_CHECK_DEVICE", "cuda") == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"backend": dist.get_backend(), "world": world}

    def check(name, fn):
        try:
            results[name] = fn()
        except Exception as e:
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}

    def all_reduce():
        t = torch.full((1000,), float(rank + 1), device=device)
        dist.all_reduce(t)
        return {"ok": bool((t == world * (world + 1) / 2).all())}

    def centre():
        g = torch.Generator().manual_seed(0)
        out_dim, b = 64, 4 * world
        teacher = torch.randn(2, b, out_dim, generator=g)
        student = torch.randn(4, b, out_dim, generator=g)
        shard = slice(rank * 4, rank * 4 + 4)
        fn = DINOLoss(out_dim, 4, 0.04, 0.04, 0, 10).to(device)
        fn(student[:, shard].reshape(-1, out_dim).to(device), teacher[:, shard].reshape(-1, out_dim).to(device), 0)
        expected = 0.1 * teacher.reshape(-1, out_dim).mean(0, keepdim=True)
        err = rel_err(fn.center, expected)
        return {"ok": err < 1e-5, "err": err}

    def sync_bn():
        if not cuda:
            return {"ok": True, "skipped": "SyncBatchNorm needs CUDA"}
        torch.manual_seed(0)
        head = vits.DINOHead(32, 64, use_bn=True).to(device)
        reference = vits.DINOHead(32, 64, use_bn=True).to(device)
        reference.load_state_dict(head.state_dict())
        model = nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(head),
                                                    device_ids=[local_rank])
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8 * world, 32, generator=g).to(device)
        shard = x[rank * 8:(rank + 1) * 8]
        with fp32_reference():
            out = model(shard)
            out.pow(2).mean().backward()
            ref = reference(x)[rank * 8:(rank + 1) * 8]
        err = rel_err(out, ref)
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        return {"ok": err < 1e-4 and grads_finite, "err": err,
                "syncbn": any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())}

    def ddp_fused_adamw_step():
        torch.manual_seed(0)
        backbone, dim = backbones.build_backbone("vit_nano", 16)
        student = utils.MultiCropWrapper(backbone, vits.DINOHead(dim, 256)).to(device)
        student = nn.parallel.DistributedDataParallel(student, device_ids=[local_rank] if cuda else None)
        args = argparse.Namespace(optimizer="adamw", backbone_lr_scale=1.0)  # main_dino.py's defaults
        optimizer = main_dino.build_optimizer(args, student)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        before = [p.detach().clone() for p in student.parameters()]
        crops = [torch.randn(2, 3, 32, 32, device=device) for _ in range(2)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = student(crops).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        moved = any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
        finite = all(torch.isfinite(p).all() for p in student.parameters())
        fused = bool(optimizer.defaults.get("fused"))
        return {"ok": moved and finite, "fused": fused}

    def gather():
        n = 7 * world - 1 if world > 1 else 5
        padded = list(range(n)) + list(range(n))[: (-n) % world]
        local = torch.tensor([[10.0 * i, 10.0 * i + 1] for i in padded[rank::world]], device=device)
        rows = backbones.gather_in_order(local, n, chunk_rows=2)
        expected = torch.tensor([[10.0 * i, 10.0 * i + 1] for i in range(n)])
        return {"ok": rows.device.type == "cpu" and torch.equal(rows, expected)}

    def collective_errors():
        messages = []
        for error in (None, "planted error" if rank == world - 1 else None):
            try:
                runtime.raise_together(error)
                messages.append(None)
            except utils.UserError as e:
                messages.append(str(e))
        stop = runtime.StopSignals(world)
        flag = torch.ones(1)
        dist.all_reduce(flag, group=runtime.cpu_group())  # the gloo group beside NCCL, even with one process
        return {"ok": messages[0] is None and messages[1] is not None and messages[1].startswith("planted error")
                and stop.agreed() == 0 and int(flag.item()) == world, "messages": messages}

    for name, fn in (("all_reduce", all_reduce), ("dino_centre", centre), ("sync_batchnorm", sync_bn),
                     ("ddp_fused_adamw", ddp_fused_adamw_step), ("gather_in_order", gather),
                     ("collective_errors", collective_errors)):
        check(name, fn)
    with open(os.path.join(out_dir, f"dist_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# Rows that one process cannot prove: SyncBatchNorm falls back to BatchNorm, the gather and raise_together skip
# their collectives. With world size 1 they are INFO, not PASS.
NEEDS_TWO = ("sync_batchnorm", "gather_in_order", "collective_errors")


def part_distributed(report: Report, device: torch.device, sizes: dict, work: str, budget: Budget) -> None:
    nproc = sizes["nproc"]
    out = os.path.join(work, "dist")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           DRIVER, "--_worker", "dist", "--out", out]
    code, output = run_logged(report, "distributed", cmd, min(180.0, max(30.0, budget.left())),
                              env={"GPU_CHECK_DEVICE": device.type, "OMP_NUM_THREADS": "1"})
    if code != 0:
        report.add("distributed", f"torchrun --nproc_per_node={nproc}", "FAIL", f"exit {code}", output[-400:])
        return
    ranks = [json.load(open(os.path.join(out, f"dist_rank{r}.json"))) for r in range(nproc)]
    backend = ranks[0]["backend"]
    report.add("distributed", f"torchrun --nproc_per_node={nproc}, {backend}", "PASS", f"world {ranks[0]['world']}")
    for name in ("all_reduce", "dino_centre", "sync_batchnorm", "ddp_fused_adamw", "gather_in_order",
                 "collective_errors"):
        outcomes = [r[name] for r in ranks]
        ok = all(o.get("ok") for o in outcomes)
        skipped = outcomes[0].get("skipped")
        detail = "; ".join(f"{k}={v}" for k, v in outcomes[0].items() if k not in ("ok",))
        if nproc == 1 and name in NEEDS_TWO and ok:
            report.add("distributed", f"{name} ({backend})", "INFO", "world size 1: collective not exercised",
                       "run on a machine of several GPUs with --nproc N to prove it; " + detail[:250])
            continue
        report.add("distributed", f"{name} ({backend})", "SKIP" if skipped else verdict(ok),
                   skipped or ("ok" if ok else "wrong"), detail[:300])

# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Part 1 of the GPU validation kit (benchmarks/gpu_check.py): the correctness checks, each against the fp32 result
of the same code (TF32 off for the references). part_correctness runs them all; one that fails is reported and the
next one runs."""
import contextlib
import math
import shutil
import time
import traceback
import warnings

import torch

from gpu_check_common import Report, autocast_for, fp32_reference, rel_err, sync, verdict


def check_vit_precisions(report: Report, device: torch.device, cfg: dict) -> None:
    """ViT forward + backward under bf16 autocast and fp16 + GradScaler, against fp32."""
    import vision_transformer as vits
    torch.manual_seed(0)
    model = getattr(vits, cfg["arch"])(patch_size=cfg["patch"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)

    def run(dtype, scaler):
        model.zero_grad(set_to_none=True)
        with autocast_for(device, dtype)():
            out = model(x)
            loss = out.float().pow(2).mean()
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)  # lr 0: no change; completes the scaler's step
            scaler.update()
        grads = torch.cat([p.grad.flatten().float() for p in params if p.grad is not None])
        return out.float().detach(), grads.detach()

    with fp32_reference():
        ref_out, ref_grad = run(None, None)
    for name, dtype, scaler, tol_out, tol_grad in (
            ("bf16 autocast", torch.bfloat16, None, 3e-2, 1.5e-1),
            ("fp16 + GradScaler", torch.float16, torch.amp.GradScaler(device.type), 1e-2, 5e-2)):
        out, grad = run(dtype, scaler)
        e_out, e_grad = rel_err(out, ref_out), rel_err(grad, ref_grad)
        finite = bool(torch.isfinite(out).all() and torch.isfinite(grad).all())
        ok = finite and e_out < tol_out and e_grad < tol_grad
        report.add("correctness", f"ViT fwd+bwd {name}", verdict(ok),
                   f"rel. error output {e_out:.1e}, gradients {e_grad:.1e}",
                   f"{cfg['arch']}/{cfg['patch']} at {cfg['size']} px, batch {cfg['batch']}; limits {tol_out:g} / "
                   f"{tol_grad:g}; finite {finite}", out_err=e_out, grad_err=e_grad)


def check_sdpa_flash(report: Report, device: torch.device) -> None:
    """The flash SDPA kernel (bf16 on CUDA, fp32 on CPU) forward and backward against the math kernel in fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(4, 6, 197, 64, generator=g).to(device).requires_grad_(True) for _ in range(3))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with sdpa_kernel([SDPBackend.MATH]), fp32_reference():
        ref = F.scaled_dot_product_attention(q, k, v)
        ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv)
        grads = torch.autograd.grad(out.float().pow(2).sum(), (qq, kk, vv))
    e_out = rel_err(out.float(), ref)
    e_grad = max(rel_err(a.float(), b) for a, b in zip(grads, ref_grads))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    report.add("correctness", "SDPA flash kernel fwd+bwd", verdict(e_out < tol and e_grad < 5 * tol),
               f"rel. error output {e_out:.1e}, gradients {e_grad:.1e}", f"{dtype}, 197 tokens, head dim 64")


def check_dino_loss(report: Report, device: torch.device, cfg: dict) -> None:
    """DINOLoss and its centre on the device against the same code on the CPU in fp32; and from bf16 logits."""
    from losses import DINOLoss
    g = torch.Generator().manual_seed(0)
    b, ncrops, out_dim = cfg["batch"], cfg["ncrops"], cfg["out_dim"]
    student = torch.randn(ncrops * b, out_dim, generator=g) * 3
    teacher = torch.randn(2 * b, out_dim, generator=g) * 3
    results = {}
    for where, s, t in (("cpu", student, teacher), (device.type, student.to(device), teacher.to(device)),
                        ("bf16", student.to(device).bfloat16(), teacher.to(device).bfloat16())):
        fn = DINOLoss(out_dim, ncrops, 0.04, 0.07, 2, 10).to(s.device)
        losses = [fn(s, t, epoch) for epoch in range(2)]  # two calls: the centre moved in between
        results[where] = (torch.stack(losses).float().cpu(), fn.center.float().cpu())
    e_loss, e_center = rel_err(results[device.type][0], results["cpu"][0]), rel_err(results[device.type][1],
                                                                                      results["cpu"][1])
    report.add("correctness", f"DINO loss and centre ({device.type} vs CPU fp32)",
               verdict(e_loss < 1e-5 and e_center < 1e-5), f"rel. error loss {e_loss:.1e}, centre {e_center:.1e}",
               f"{ncrops} crops x {b} images, out_dim {out_dim}")
    e_loss, e_center = rel_err(results["bf16"][0], results["cpu"][0]), rel_err(results["bf16"][1], results["cpu"][1])
    report.add("correctness", "DINO loss and centre from bf16 logits", verdict(e_loss < 2e-2 and e_center < 2e-2),
               f"rel. error loss {e_loss:.1e}, centre {e_center:.1e}", "the loss computes in fp32 under autocast")


def step_args(cfg: dict, device: torch.device, out_dir: str, extra=()):
    import main_dino
    argv = ["--arch", cfg["arch"], "--patch_size", str(cfg["patch"]), "--out_dim", str(cfg["out_dim"]),
            "--batch_size_per_gpu", str(cfg["batch"]), "--local_crops_number", str(cfg["local_crops"]),
            "--global_crops_size", str(cfg["global_size"]), "--local_crops_size", str(cfg["local_size"]),
            "--drop_path_rate", "0", "--output_dir", out_dir, "--print_freq", "1000", *extra]
    args = main_dino.get_args_parser().parse_args(argv)
    main_dino.check_args(args)
    args.rank, args.world_size, args.gpu, args.device = 0, 1, device.index or 0, device
    return args


def dino_steps(cfg: dict, device: torch.device, precision: str, work: str, steps: int = 2, deterministic=False):
    """`steps` optimizer steps of main_dino's loop (build_training + dino_step + engine.train_one_epoch) on fixed
    synthetic crops, from seed 0: (losses, student state, scaler)."""
    import engine
    import main_dino
    import runtime
    args = step_args(cfg, device, work, ["--use_fp16", str(precision != "fp32"),
                                         "--amp_dtype", "fp16" if precision == "fp16" else "bf16"])
    # fp16: the GradScaler path of --skip_nonfinite too
    guard = engine.NonFiniteGuard(device, skip_nonfinite=1 if precision == "fp16" else 0)
    torch.manual_seed(0)
    run = main_dino.build_training(args, niter_per_ep=steps)
    autocast, scaler = run.precision.autocast, run.precision.scaler
    if precision == "fp32":
        autocast, scaler = contextlib.nullcontext, None
    elif device.type == "cpu":  # precision_setup offers fp16 on GPUs only: the same loop with a CPU scaler
        autocast = autocast_for(device, torch.bfloat16 if precision == "bf16" else torch.float16)
        scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    g = torch.Generator().manual_seed(1)
    b = cfg["batch"]
    crops = [torch.randn(b, 3, cfg["global_size"], cfg["global_size"], generator=g) for _ in range(2)]
    crops += [torch.randn(b, 3, cfg["local_size"], cfg["local_size"], generator=g) for _ in range(cfg["local_crops"])]
    loader = [(crops, torch.zeros(b, dtype=torch.long), [""] * b)] * steps
    step = main_dino.dino_step(run.student, run.teacher, run.teacher_without_ddp, run.dino_loss)
    after_step = main_dino.ema_update(run.student, run.teacher_without_ddp, run.momentum_schedule)
    losses = []

    def recorded(batch, epoch, it):
        loss, terms = step(batch, epoch, it)
        losses.append(float(loss.detach()))
        return loss, terms
    engine.train_one_epoch(recorded, run.student, run.optimizer, loader, run.lr_schedule, run.wd_schedule, 1,
                           args, after_step=after_step, precision=runtime.Precision(autocast, scaler, precision),
                           guard=guard)
    state = {k: v.detach().clone() for k, v in engine.unwrap(run.student).state_dict().items()}
    return losses, state, scaler


def check_training_steps(report: Report, device: torch.device, cfg: dict, work: str) -> None:
    """One step of main_dino.py's loop per precision: finite, the same first loss (same initial weights)."""
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        start = time.time()
        if precision == "fp32":
            with fp32_reference():
                results[precision] = dino_steps(cfg, device, precision, work)
        else:
            results[precision] = dino_steps(cfg, device, precision, work)
        results[precision] += (time.time() - start,)
    ref = results["fp32"][0][0]
    for precision, (losses, state, scaler, seconds) in results.items():
        finite = all(math.isfinite(x) for x in losses) and all(torch.isfinite(v).all() for v in state.values()
                                                                if v.is_floating_point())
        err = abs(losses[0] - ref) / abs(ref)
        tol = 0.0 if precision == "fp32" else 2e-2
        detail = f"{cfg['arch']}/{cfg['patch']}, {cfg['global_size']}+{cfg['local_crops']}x{cfg['local_size']} px, " \
                 f"batch {cfg['batch']}, out_dim {cfg['out_dim']}; first loss vs fp32 within {tol:g}; {seconds:.1f} s"
        if scaler is not None:
            detail += f"; GradScaler scale {scaler.get_scale():g}"
        report.add("correctness", f"main_dino step {precision}", verdict(finite and err <= tol),
                   "losses " + ", ".join(f"{x:.5f}" for x in losses) + f"; rel. diff {err:.1e}", detail,
                   losses=losses)


def check_deterministic(report: Report, device: torch.device, cfg: dict, work: str) -> None:
    """Two runs of two bf16 steps: bitwise equal weights with --deterministic (and how far apart without)."""
    import runtime
    outcomes = {}
    try:
        for deterministic in (False, True):
            runtime.gpu_math_setup(deterministic)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                states = [dino_steps(cfg, device, "bf16", work)[1] for _ in range(2)]
            same = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
            diff = max(float((states[0][k].float() - states[1][k].float()).abs().max()) for k in states[0]
                       if states[0][k].is_floating_point())
            ops = sorted({str(w.message).split(" does not have a deterministic")[0].strip()
                          for w in caught if "deterministic" in str(w.message)})
            outcomes[deterministic] = (same, diff, ops)
    finally:
        runtime.gpu_math_setup(False)
    same, diff, ops = outcomes[True]
    report.add("correctness", "--deterministic: bitwise equal reruns", verdict(same),
               f"equal {same} (max diff {diff:.1e})",
               ("ops without a deterministic kernel (warned): " + "; ".join(ops)[:300]) if ops else "no op warned")
    same, diff, _ = outcomes[False]
    report.add("correctness", "default (autotuned, TF32): reruns", "INFO", f"equal {same} (max diff {diff:.1e})",
               "not bitwise on GPU: same samples, order and RNG only")


def check_compile(report: Report, device: torch.device, cfg: dict) -> None:
    """--compile's path (ssl_meta_arch.compile_forward_features, which both training scripts use) at one
    resolution: the same tokens as eager, the compile time, the speed-up of a forward."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("cc")):
        report.add("correctness", "--compile forward_features", "SKIP", "no C++ compiler on this CPU machine")
        return
    import ssl_meta_arch
    import vision_transformer as vits
    torch.manual_seed(0)
    model = getattr(vits, cfg["arch"])(patch_size=cfg["patch"]).to(device).eval()
    x = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    autocast = autocast_for(device, dtype)

    def timed(n: int):
        sync(device)
        start = time.time()
        for _ in range(n):
            with torch.no_grad(), autocast():
                out = model.forward_features(x)
        sync(device)
        return out.float(), (time.time() - start) / n
    eager, _ = timed(1)
    _, eager_s = timed(3)
    keys = list(model.state_dict())
    ssl_meta_arch.compile_forward_features(model)
    start = time.time()
    compiled, _ = timed(1)
    compile_s = time.time() - start
    _, compiled_s = timed(3)
    err = rel_err(compiled, eager)
    tol = 2e-2 if dtype is not None else 1e-4
    report.add("correctness", "--compile forward_features", verdict(err < tol and list(model.state_dict()) == keys),
               f"rel. error {err:.1e}; compile {compile_s:.0f} s; forward {eager_s * 1e3:.1f} -> "
               f"{compiled_s * 1e3:.1f} ms", f"{cfg['arch']}/{cfg['patch']} at {cfg['size']} px, batch "
               f"{cfg['batch']}, {'bf16' if dtype else 'fp32'}; state_dict keys unchanged", compile_s=compile_s)


def check_spd(report: Report, device: torch.device, cfg: dict) -> None:
    """The SPD loss (forward + backward) at the distillation defaults' shape: cuSOLVER (looped past n = 32)
    against MAGMA (batched), same result."""
    from losses import spd
    g = torch.Generator().manual_seed(0)
    s = torch.randn(cfg["batch"], cfg["patches"], cfg["ds"], generator=g).to(device).requires_grad_(True)
    t = torch.randn(cfg["batch"], cfg["patches"], cfg["dt"], generator=g).to(device)
    libraries = ["default"]
    if device.type == "cuda" and getattr(torch.cuda, "has_magma", False):
        libraries.append("magma")
    results = {}
    saved = spd.CUDA_EIGH_LIBRARY
    try:
        for library in libraries:
            spd.CUDA_EIGH_LIBRARY = library
            times = []
            for _ in range(1 + cfg["reps"]):  # the first call warms up
                s.grad = None
                sync(device)
                start = time.time()
                loss = spd.spd_loss(s, t)
                loss.backward()
                sync(device)
                times.append(time.time() - start)
            results[library] = (float(loss), s.grad.clone(), min(times[1:]))
    finally:
        spd.CUDA_EIGH_LIBRARY = saved
    shape = f"{cfg['batch']} x 2 sides of {cfg['patches']} x {cfg['patches']} float64"
    for library, (value, _, seconds) in results.items():
        report.add("correctness", f"SPD loss fwd+bwd, eigh via {library}", "INFO", f"{seconds * 1e3:.0f} ms per step",
                   f"{shape}; loss {value:.6f}", seconds=seconds)
    if "magma" in results:
        err = rel_err(results["magma"][1], results["default"][1])
        faster = min(results, key=lambda k: results[k][2])
        report.add("correctness", "SPD loss: MAGMA = cuSOLVER", verdict(err < 1e-6),
                   f"gradient rel. error {err:.1e}; faster: {faster} "
                   f"({results['default'][2] / results['magma'][2]:.1f}x cuSOLVER's time)",
                   "losses/spd.py CUDA_EIGH_LIBRARY 'auto' picks MAGMA: set 'default' if cuSOLVER is faster here")
    elif device.type == "cuda":
        report.add("correctness", "SPD loss: MAGMA", "SKIP", "this PyTorch build has no MAGMA: cuSOLVER is used")
    else:
        report.add("correctness", "SPD loss: MAGMA vs cuSOLVER", "SKIP", "CUDA only")


def part_correctness(report: Report, device: torch.device, sizes: dict, work: str) -> None:
    for fn, args in ((check_vit_precisions, (sizes["vit"],)), (check_sdpa_flash, ()),
                     (check_dino_loss, (sizes["loss"],)), (check_training_steps, (sizes["step"], work)),
                     (check_deterministic, (sizes["det"], work)), (check_compile, (sizes["compile"],)),
                     (check_spd, (sizes["spd"],))):
        try:
            fn(report, device, *args)
        except Exception as e:  # report and go on: the other checks still tell something
            report.add("correctness", fn.__name__, "FAIL", f"{type(e).__name__}: {str(e)[:200]}",
                       traceback.format_exc(limit=3)[-600:])
        if device.type == "cuda":
            torch.cuda.empty_cache()

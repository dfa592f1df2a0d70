"""The GPU code paths, tested where a CPU can test them (issue 17's defects 2-7): fp16 with a GradScaler under
--skip_nonfinite (a CPU GradScaler), one GPU per SLURM task and bf16 detection (a faked torch.cuda), decisions
that stop a run taken by all ranks together and chunked feature gathering (real 2-process gloo groups), SyncBN and
--compile in distillation, the packed-index iBOT path, TF32 and --deterministic, srun's --kill-on-bad-exit.

Run as a script under torchrun, this file is also the worker of the 2-process tests:
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/test_gpu_paths.py OUT_DIR
"""
import argparse
import builtins
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backbones  # noqa: E402
import runtime
import data  # noqa: E402
import engine  # noqa: E402
import utils  # noqa: E402

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------
# Defect 2: fp16 + GradScaler with --skip_nonfinite
# --------------------------------------------------------------------------------------------------
def loop_args(**overrides) -> argparse.Namespace:
    """The flags engine.train_one_epoch reads, for a one-process CPU run."""
    args = argparse.Namespace(grad_accum_steps=1, clip_grad=0.0, freeze_last_layer=0, freeze_backbone_epochs=0,
                              epochs=1, print_freq=100, batch_size_per_gpu=2, world_size=1, rank=0,
                              device=torch.device("cpu"))
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def fp16(scaler):
    """runtime.precision_setup's answer for fp16 with `scaler` (a CPU GradScaler here), autocast left out."""
    return runtime.Precision(contextlib.nullcontext, scaler, "fp16 with gradient scaler")


def run_epoch(model, steps, make_loss, scaler, args, guard=None, run=None):
    """train_one_epoch over `steps` batches; `make_loss(model, x, it)` gives each step's loss. `guard`: by
    default one that skips up to one non-finite step (--skip_nonfinite 1)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, 4, generator=g), torch.zeros(2), ["", ""]) for _ in range(steps)]

    def step(batch, epoch, it):
        return make_loss(model, batch, it), {}
    return engine.train_one_epoch(step, model, optimizer, loader, [0.1] * steps, [0.0] * steps, 0, args,
                                  precision=fp16(scaler), run=run,
                                  guard=guard or engine.NonFiniteGuard(args.device, skip_nonfinite=1))


def test_fp16_scaler_skips_a_nan_loss_step_and_counts_it():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    args = loop_args(clip_grad=3.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    weights = []

    def make_loss(m, x, it):
        weights.append(m.weight.detach().clone())
        loss = m(x).pow(2).mean()
        return loss * float("nan") if it == 1 else loss

    # before the fix: RuntimeError "No inf checks were recorded for this optimizer" at the skipped step
    guard = engine.NonFiniteGuard(args.device, skip_nonfinite=1)
    run_epoch(model, 3, make_loss, scaler, args, guard)
    weights.append(model.weight.detach().clone())
    assert guard.skipped == 1
    assert torch.equal(weights[1], weights[2]), "the skipped step must not update the weights"
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[2], weights[3])
    assert torch.isfinite(model.weight).all()


def test_fp16_scaler_overflow_with_finite_loss_is_left_to_the_scaler_not_counted():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    args = loop_args()
    # a scale so large that the scaled gradients overflow float32 while the loss itself is finite
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=1000)
    before = model.weight.detach().clone()

    def make_loss(m, x, it):
        return 100 * m(x).pow(2).mean()

    guard = engine.NonFiniteGuard(args.device, skip_nonfinite=1)
    run_epoch(model, 1, make_loss, scaler, args, guard)
    assert guard.skipped == 0, "an fp16 overflow is GradScaler's to skip, not a bad step"
    assert torch.equal(model.weight, before), "GradScaler skips the overflowing step"
    assert scaler.get_scale() < 2.0 ** 127, "and lowers its scale"
    # the next steps, at a sane scale, train
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    run_epoch(model, 2, make_loss, scaler, args, guard)
    assert guard.skipped == 0 and not torch.equal(model.weight, before)


def test_fp16_scaler_stops_at_the_second_nan_step_with_skip_nonfinite_1():
    model = nn.Linear(4, 3)
    args = loop_args()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def make_loss(m, x, it):
        loss = m(x).pow(2).mean()
        return loss * float("nan") if it in (0, 2) else loss

    guard = engine.NonFiniteGuard(args.device, skip_nonfinite=1)
    with pytest.raises(utils.UserError, match=r"after 1 skipped step"):
        run_epoch(model, 4, make_loss, scaler, args, guard)
    assert guard.skipped == 2


def test_skip_judges_only_the_loss_when_the_scaler_checks_the_gradients():
    model = nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    model.weight.grad.fill_(float("inf"))
    guard = engine.NonFiniteGuard(torch.device("cpu"), skip_nonfinite=1)
    assert not guard.skip(model, torch.tensor(1.0), 0, 0, check_grads=False)
    assert guard.skip(model, torch.tensor(1.0), 0, 0, check_grads=True)
    assert guard.skipped == 1


def test_logged_gradient_norm_is_the_true_one_under_an_fp16_scaler(tmp_path):
    """With a GradScaler and no clipping, the gradients are unscaled before they are logged: log_iters.jsonl's
    grad_norm is the norm of the true gradients, not of the scaled ones (2**10 times larger here)."""
    import tracking
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))  # run_epoch's first batch
    reference(x).pow(2).mean().backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()
    tracker = tracking.Tracker(str(tmp_path), start_iteration=0, iters_per_epoch=1, images_per_batch=2, log_freq=1)
    run = types.SimpleNamespace(tracker=tracker, rank_position=lambda epoch: None, between_steps=lambda it, fn: None,
                                clock=types.SimpleNamespace(step_done=lambda it: None))
    with tracker:
        run_epoch(model, 1, lambda m, x, it: m(x).pow(2).mean(), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10),
                  loop_args(), run=run)
    assert tracking.read_history(str(tmp_path), as_dataframe=False)["grad_norm"] == [pytest.approx(expected, rel=1e-5)]


# --------------------------------------------------------------------------------------------------
# Defect 3: one GPU bound per SLURM task
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("visible, expected", [(1, 0), (8, 7), (4, 3)])
def test_slurm_local_id_modulo_visible_gpus(monkeypatch, visible, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(SLURM_PROCID="7", SLURM_NTASKS="8", SLURM_LOCALID="7", SLURM_JOB_NODELIST="gpu[003-004]",
               SLURM_JOB_ID="4242")
    monkeypatch.setattr(os, "environ", env)
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(builtins, "print", builtins.print)  # setup_for_distributed silences rank 7: restored after
    args = argparse.Namespace(dist_url="env://", dist_timeout=1)
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (7, 8, expected)
    assert calls["set_device"] == expected and args.device == torch.device("cuda", expected)
    assert calls["init"]["backend"] == "nccl" and calls["init"]["world_size"] == 8
    assert env["LOCAL_RANK"] == str(expected) and env["MASTER_ADDR"] == "gpu003"


# --------------------------------------------------------------------------------------------------
# Defect 4: --amp_dtype auto without emulated bf16
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native, expected", [(False, "fp16"), (True, "bf16")])
def test_amp_auto_asks_for_native_bf16_only(monkeypatch, native, expected):
    seen = []

    def is_bf16_supported(including_emulation=True):
        seen.append(including_emulation)
        return native or including_emulation  # a V100/T4 emulates bf16: True only when emulation counts

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    _, scaler, description = runtime.precision_setup(torch.device("cuda", 0), True, "auto")
    assert seen == [False]
    assert description.startswith(expected)
    assert (scaler is not None) == (expected == "fp16")
    if expected == "fp16":
        assert isinstance(scaler, torch.amp.GradScaler)


# --------------------------------------------------------------------------------------------------
# Defect 8: TF32 and --deterministic
# --------------------------------------------------------------------------------------------------
def test_gpu_math_setup_tf32_and_deterministic(monkeypatch):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        runtime.gpu_math_setup(False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        runtime.gpu_math_setup(True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        runtime.gpu_math_setup(False)  # undone (the kit checks both in one process)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def test_deterministic_flag_parses_and_sets_cublas_workspace(monkeypatch, tmp_path):
    import main_dino
    import main_distill
    for module in (main_dino, main_distill):
        args = module.get_args_parser().parse_args(["--deterministic", "true"])
        assert args.deterministic is True
        assert "bitwise" in module.get_args_parser().format_help()
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "RANK", "WORLD_SIZE")}
    monkeypatch.setattr(os, "environ", env)
    seen = []
    monkeypatch.setattr(runtime, "gpu_math_setup", seen.append)
    monkeypatch.setattr(builtins, "print", builtins.print)
    args = main_dino.get_args_parser().parse_args(["--deterministic", "true", "--output_dir", str(tmp_path)])
    runtime.setup_run(args, deterministic=args.deterministic)  # as main_dino.train_dino calls it
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and seen == [True]


# --------------------------------------------------------------------------------------------------
# Defect 5: one rank's fatal error stops all ranks (2-process runs)
# --------------------------------------------------------------------------------------------------
def test_run_with_submitit_kills_the_job_step_on_a_bad_exit(monkeypatch, tmp_path):
    import submitit
    import run_with_submitit
    seen = {}

    class FakeExecutor:
        cluster = "slurm"

        def __init__(self, folder, **kwargs):
            pass

        def update_parameters(self, **kwargs):
            seen.update(kwargs)

        def submit(self, trainer):
            return argparse.Namespace(job_id="1")

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    run_with_submitit.main(["--script", "main_dino.py", "--job_dir", str(tmp_path), "--ngpus", "1",
                            "--data_path", "synthetic", "--output_dir", str(tmp_path / "out")])
    assert "--kill-on-bad-exit=1" in seen["slurm_srun_args"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unwritable_output_dir_on_rank_0_stops_both_ranks_quickly(tmp_path):
    """Only rank 0 checks the output folder; rank 1 must not go on to wait in its next collective."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # cannot be created: its parent is a file
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    cmd = [sys.executable, str(REPO / "main_dino.py"), "--arch", "vit_nano", "--data_path", "synthetic",
           "--output_dir", str(out), "--dist_timeout", "2", "--num_workers", "0"]
    start = time.time()
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for r in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=100)
            results.append((p.returncode, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    elapsed = time.time() - start
    for rank, (code, stderr) in enumerate(results):
        assert code == 2, (rank, stderr[-3000:])
        assert "is not writable" in stderr and str(out) in stderr, (rank, stderr[-3000:])
        assert "Traceback" not in stderr
    assert elapsed < 100  # --dist_timeout is 2 minutes: nobody waited for it


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """The worker below, run once on 2 gloo processes: each rank's outcome of every scenario."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "test_gpu_paths.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_raise_together_every_rank_raises_the_same_error(two_rank_results):
    r0, r1 = two_rank_results
    assert r0["raise_together"] == r1["raise_together"] == "disk full on rank 1 (found by rank 1)"
    assert r0["raise_together_none"] == r1["raise_together_none"] == "no error"


def test_nonfinite_loss_on_one_rank_stops_both(two_rank_results):
    messages = [r["check_finite"] for r in two_rank_results]
    assert messages[0] == messages[1] and messages[0].startswith("Loss is nan at epoch 0, iteration 3")


def test_bad_image_threshold_on_one_rank_stops_both_in_the_loop(two_rank_results):
    messages = [r["bad_images"] for r in two_rank_results]
    assert messages[0] == messages[1] and "2 unreadable images out of 4" in messages[0], messages
    assert [r["bad_images_step"] for r in two_rank_results] == [0, 0]  # both stop before their step 1


def test_gather_in_order_in_chunks_on_two_ranks(two_rank_results):
    for r in two_rank_results:
        for chunk, rows in r["gather"].items():
            assert rows == [[10 * i, 10 * i + 1, 10 * i + 2] for i in range(7)], chunk


def two_rank_worker(out_dir: str) -> None:
    """The 2-process scenarios; each rank writes what it saw to OUT_DIR/rank{r}.json."""
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {}

    def outcome(fn):
        try:
            fn()
            return "no error"
        except utils.UserError as e:
            return str(e)

    results["raise_together"] = outcome(lambda: runtime.raise_together("disk full on rank 1" if rank == 1 else None))
    results["raise_together_none"] = outcome(lambda: runtime.raise_together(None))

    # the loss check after the backward of batch 3: the loss is NaN on rank 1 only
    results["check_finite"] = outcome(lambda: engine.NonFiniteGuard(torch.device("cpu")).watch(
        torch.tensor(float("nan") if rank == 1 else 1.0), 0, 3))

    # the training loop: rank 0 meets two unreadable images at its step 1, rank 1 none; limit 1 of 4 images
    tracker = data.BadImageTracker(dataset_size=4, max_fraction=0.25)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps_seen = []
    bad = [["", ""], ["/d/x.jpg: OSError: truncated", "/d/y.jpg: OSError: truncated"], ["", ""]]
    loader = [(torch.randn(2, 4), torch.zeros(2), bad[i] if rank == 0 else ["", ""]) for i in range(3)]

    def step(batch, epoch, it):
        steps_seen.append(it)
        return model(batch).pow(2).mean(), {}
    results["bad_images"] = outcome(lambda: engine.train_one_epoch(
        step, model, optimizer, loader, [0.1] * 3, [0.0] * 3, 0, loop_args(world_size=world, rank=rank),
        bad_images=tracker))
    results["bad_images_step"] = steps_seen[-1]

    # backbones.gather_in_order: rank r holds rows r, r + 2, ... of 7 samples padded to 8 (the padding repeats
    # sample 0), gathered in chunks of 1, 3 and all rows
    padded = list(range(7)) + [0]
    local = torch.tensor([[10 * i, 10 * i + 1, 10 * i + 2] for i in padded[rank::world]], dtype=torch.float32)
    results["gather"] = {str(c): backbones.gather_in_order(local, 7, chunk_rows=c).long().tolist()
                         for c in (1, 3, 4096)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    runtime.barrier()
    runtime.leave_without_finalization(0)  # how our scripts end (runtime.run_script): no gloo teardown abort


# --------------------------------------------------------------------------------------------------
# Defect 6 and 8 in distillation: --compile reaches forward_features, SyncBN, masked rows without a host sync
# --------------------------------------------------------------------------------------------------
def test_compile_forward_features_compiles_what_distillation_runs(monkeypatch):
    import ssl_meta_arch
    import vision_transformer as vits
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append((fn, kwargs))

        def wrapper(*a, **k):
            wrapper.calls += 1
            return fn(*a, **k)
        wrapper.calls = 0
        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    student = vits.vit_nano(patch_size=16, masked_im_modeling=True)
    teacher = vits.vit_nano(patch_size=16)
    keys = [list(m.state_dict()) for m in (student, teacher)]
    ssl_meta_arch.compile_forward_features(student, teacher)
    ssl_meta_arch.compile_forward_features(student, teacher)  # idempotent
    assert len(compiled) == 2 and all(kw == {"dynamic": False} for _, kw in compiled)
    assert [list(m.state_dict()) for m in (student, teacher)] == keys
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 1] = True
    ssl_meta_arch.tokens_and_grid(student, x, masks)
    ssl_meta_arch.tokens_and_grid(teacher, x)
    student(x)  # the local crops' path (forward) goes through the compiled forward_features too
    assert student.forward_features.calls == 2 and teacher.forward_features.calls == 1


def test_masked_rows_by_index_equal_boolean_indexing():
    import ssl_meta_arch
    import masking
    from losses import iBOTPatchLoss
    g = torch.Generator().manual_seed(0)
    b, n, d = 3, 6, 5
    samples = [((["crops"], torch.rand(2, n, generator=g) < 0.4), 0, "") for _ in range(b)]
    samples[0][0][1][:] = False  # a sample with no masked patch
    (_, masks, mask_index), _, _ = masking.collate_masked_crops(
        [(([torch.zeros(1)], m), t, e) for (_, m), t, e in samples])
    crop_major = masks.transpose(0, 1).flatten(0, 1)
    tokens = torch.randn(2 * b, n, d, generator=g)
    assert torch.equal(ssl_meta_arch.masked_rows(tokens, crop_major, mask_index), tokens[crop_major])
    student = torch.randn(int(crop_major.sum()), 8, generator=g)
    teacher = torch.randn(int(crop_major.sum()), 8, generator=g)
    losses = [iBOTPatchLoss(8)(student, teacher, crop_major, 0, mask_index=idx) for idx in (None, mask_index)]
    torch.testing.assert_close(losses[0], losses[1])


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_distribute_synchronises_batch_norms_on_cuda_only(monkeypatch, capsys, device):
    """engine.distribute, which main_dino.py (student and EMA teacher) and main_distill.py (student) use: with
    several processes, batch norms become SyncBatchNorm on CUDA only (said on CPU), the student goes into DDP,
    and a teacher with batch norms too (the official way of making them work); one process changes nothing."""
    import inspect
    import main_distill
    wrapped = []

    class FakeDDP(nn.Module):  # DDP itself needs a process group
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module, self.device_ids = module, device_ids
            wrapped.append(self)

    def bn_net():
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", FakeDDP)
    student, teacher = bn_net(), bn_net()
    assert engine.distribute(student, torch.device(device, 0) if device == "cuda" else torch.device(device),
                             teacher) == (student, teacher)  # one process
    monkeypatch.setattr(runtime, "get_world_size", lambda: 2)
    target = torch.device(device, 0) if device == "cuda" else torch.device(device)
    d_student, d_teacher = engine.distribute(bn_net(), target, bn_net())
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in d_student.modules())
    assert isinstance(d_student, FakeDDP) and synced == (device == "cuda")
    assert d_student.device_ids == ([0] if device == "cuda" else None)
    assert isinstance(d_teacher, FakeDDP) == (device == "cuda")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in d_teacher.modules()) == (device == "cuda")
    assert ("not synchronised across CPU processes" in capsys.readouterr().out) == (device == "cpu")
    d_student, d_teacher = engine.distribute(nn.Linear(4, 4), target, nn.Linear(4, 4))  # no batch norm
    assert isinstance(d_student, FakeDDP) and not isinstance(d_teacher, FakeDDP)
    assert "engine.distribute(student, args.device)" in inspect.getsource(main_distill.train_distill)


def test_spd_eigh_library_choice(monkeypatch):
    from losses import spd
    cpu = torch.zeros(4, 40, 40)
    assert spd._eigh_library(cpu) == "default"

    class FakeCuda:
        device = torch.device("cuda", 0)
        shape = (128, 196, 196)

        def dim(self):
            return 3
    monkeypatch.setattr(torch.cuda, "has_magma", True, raising=False)
    assert spd._eigh_library(FakeCuda()) == "magma"
    FakeCuda.shape = (128, 32, 32)
    assert spd._eigh_library(FakeCuda()) == "default"  # cuSOLVER's batched Jacobi up to 32
    monkeypatch.setattr(spd, "CUDA_EIGH_LIBRARY", "default")
    FakeCuda.shape = (128, 196, 196)
    assert spd._eigh_library(FakeCuda()) == "default"
    monkeypatch.setattr(spd, "CUDA_EIGH_LIBRARY", "auto")
    monkeypatch.setattr(torch.cuda, "has_magma", False, raising=False)
    assert spd._eigh_library(FakeCuda()) == "default"  # a build without MAGMA


def test_loader_prefetch_factor_is_2():
    loader = data.build_loader(list(range(8)), 2, 1, 0)
    assert loader.prefetch_factor == 2


# --------------------------------------------------------------------------------------------------
# The GPU validation kit, on the CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_kit_runs_every_path_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --device cpu --quick: every part runs (tiny sizes), no check fails, the table is
    printed and written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", DINO_SYNTHETIC_ROOT=str(REPO / "data_cache"))
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--device", "cpu",
                           "--quick"], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = {(r["part"], r["check"]): r for r in summary["rows"]}
    assert not [r for r in summary["rows"] if r["status"] == "FAIL"]
    for key in [("correctness", "ViT fwd+bwd bf16 autocast"), ("correctness", "ViT fwd+bwd fp16 + GradScaler"),
                ("correctness", "main_dino step fp16"), ("correctness", "--deterministic: bitwise equal reruns"),
                ("distributed", "gather_in_order (gloo)"), ("distributed", "collective_errors (gloo)")]:
        assert rows[key]["status"] == "PASS", rows.get(key)
    assert rows[("correctness", "--compile forward_features")]["status"] in ("PASS", "SKIP")
    parts = {r["part"] for r in summary["rows"]}
    assert {"correctness", "distributed", "data", "throughput", "convergence"} <= parts
    assert any(r["check"].startswith("eval_knn.py 20-NN") for r in summary["rows"])
    assert "failed check(s)" in proc.stdout and (tmp_path / "out" / "gpu_check.txt").is_file()
    assert (tmp_path / "out" / "gpu_check.log").is_file()


def gpu_check_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check
    return gpu_check


def test_gpu_check_runs_throughput_before_convergence_and_keeps_its_minimum():
    """The first GPU run must bring back the speed figures (--compile included) and still leave the convergence part
    the time its floor needs: throughput parts first, convergence last, its minimum reserved from the earlier
    parts, never cut below its floor when the reserve was kept."""
    gc = gpu_check_module()
    assert gc.PARTS.index("compile_throughput") < gc.PARTS.index("convergence") == len(gc.PARTS) - 1
    assert gc.PARTS.index("throughput") < gc.PARTS.index("compile_throughput")
    assert gc.CONVERGENCE_MIN_S >= gc.CONVERGENCE_FLOOR_S + 60 and gc.CONVERGENCE_FLOOR_S >= 90
    parts = list(gc.PARTS)
    for i, part in enumerate(parts):
        expected = gc.CONVERGENCE_MIN_S if part != "convergence" else 0.0
        assert gc.reserve_before(parts, i, quick=False) == expected, part
    assert gc.reserve_before(parts, 0, quick=True) == 0.0  # --quick: tiny sizes, no reserve
    assert gc.reserve_before(["throughput", "compile_throughput"], 0, quick=False) == 0.0
    # the reserve left for convergence: its training is at least the floor, the plan when there is room
    assert gc.convergence_seconds(150.0, gc.CONVERGENCE_MIN_S) == gc.CONVERGENCE_FLOOR_S
    assert gc.convergence_seconds(150.0, 400.0) == 150.0
    assert gc.convergence_seconds(150.0, 50.0) == 20.0  # a short --budget_s: what is left
    # a compile part that would eat the reserve is skipped, not run into it
    budget = gc.Budget(240.0)
    budget.reserved = gc.CONVERGENCE_MIN_S
    assert budget.left() < gc.COMPILE_NEEDS_S
    assert round(gc.epochs_in(1800.0, 5000.0, 50000)) == 180


def test_gpu_check_distributed_rows_of_one_process_are_info(tmp_path):
    """With world size 1 SyncBatchNorm falls back to BatchNorm and the gather and raise_together skip their
    collectives: those rows say INFO, not PASS (gloo, on this CPU, with --nproc 1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--only", "distributed", "--nproc", "1", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = {r["check"]: r for r in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"]}
    for name in ("sync_batchnorm (gloo)", "gather_in_order (gloo)", "collective_errors (gloo)"):
        assert rows[name]["status"] == "INFO" and "world size 1" in rows[name]["value"], rows[name]
    assert rows["all_reduce (gloo)"]["status"] == "PASS"
    assert "torchrun --nproc_per_node=1, gloo" in rows

if __name__ == "__main__":
    two_rank_worker(sys.argv[1])

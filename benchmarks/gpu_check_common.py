# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""The GPU validation kit's shared pieces (benchmarks/gpu_check.py is the kit): the summary table (Report), the time
budget, the comparison helpers of its checks and run_logged, which runs a subprocess into the subprocess log.
Imported first by the kit: puts the repository on sys.path and sets --deterministic's cuBLAS setting before any
CUDA work."""
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

# --deterministic's cuBLAS setting, read when cuBLAS starts: set before any CUDA work, for check_deterministic
CUBLAS_WORKSPACE_WAS_SET = "CUBLAS_WORKSPACE_CONFIG" in os.environ
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
class Report:
    """The rows of the summary table, written to OUT as they come."""

    def __init__(self, out_dir: str, meta: dict):
        self.out_dir, self.meta, self.rows = out_dir, meta, []
        os.makedirs(out_dir, exist_ok=True)
        self.sub_log = os.path.join(out_dir, "gpu_check_subprocesses.log")
        open(self.sub_log, "w").close()

    def add(self, part: str, check: str, status: str, value: str = "", detail: str = "", **numbers) -> None:
        """status: PASS / FAIL (correctness), MET / MISSED (a goal of the issue), INFO (a figure), SKIP."""
        row = {"part": part, "check": check, "status": status, "value": value, "detail": detail, **numbers}
        self.rows.append(row)
        print(f"[{status}] {part} / {check}: {value}" + (f"  ({detail})" if detail else ""), flush=True)
        self.write()

    def table(self) -> str:
        rows = [("part", "check", "status", "value")]
        rows += [(r["part"], r["check"], r["status"], r["value"]) for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 30)
        return "\n".join(lines)

    def failed(self) -> int:
        return sum(r["status"] == "FAIL" for r in self.rows)

    def write(self) -> None:
        self.meta["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        with open(os.path.join(self.out_dir, "gpu_check.json"), "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows}, f, indent=1)
        with open(os.path.join(self.out_dir, "gpu_check.txt"), "w") as f:
            f.write(self.summary())

    def summary(self) -> str:
        m = self.meta
        return (f"# GPU check: {m.get('device_name')} ({m.get('device')}), torch {m.get('torch')}, "
                f"{m.get('started')} -> {m.get('finished')}, {m.get('elapsed_s', 0):.0f} s, "
                f"{'quick' if m.get('quick') else 'full'}\n{self.table()}\n"
                f"{self.failed()} failed check(s)\n")


class Budget:
    """The kit's time: `left()` for the part running now, less what is `reserved` for the parts after it (the
    convergence part's guaranteed minimum), so that an earlier part cannot eat it."""

    def __init__(self, seconds: float):
        self.start, self.seconds, self.reserved = time.time(), seconds, 0.0

    def left(self) -> float:
        return self.seconds - (time.time() - self.start) - self.reserved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@contextlib.contextmanager
def fp32_reference():
    """True fp32 products for a reference (TF32 off), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def autocast_for(device: torch.device, dtype):
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext


# ----------------------------------------------------------------------------------------------------
# Subprocesses
# ----------------------------------------------------------------------------------------------------
def run_logged(report: Report, name: str, cmd, timeout: float, env=None, cwd=REPO_ROOT):
    """Run `cmd`, its output appended to the subprocess log; on timeout SIGTERM (then SIGKILL) its process group.
    Returns (exit code or None when killed at the timeout, output)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get(
        "PYTHONPATH", ""), **(env or {}))
    if not CUBLAS_WORKSPACE_WAS_SET:  # set for this process's --deterministic check only
        full_env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    print(f"  $ {' '.join(map(str, cmd))}   (at most {timeout:.0f} s)", flush=True)
    start = time.time()
    with open(report.sub_log, "a") as log:
        log.write(f"\n===== {name}: {' '.join(map(str, cmd))}\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines, code = [], None
        try:
            deadline = start + timeout
            import selectors
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            terminated = False
            while True:
                remaining = deadline - time.time()
                if remaining <= 0 and not terminated:
                    os.killpg(proc.pid, signal.SIGTERM)  # a training run checkpoints and stops
                    terminated, deadline = True, time.time() + 60
                    continue
                if remaining <= 0 and terminated:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                if sel.select(timeout=min(remaining, 1.0)):
                    line = proc.stdout.readline()
                    if not line:
                        break
                    lines.append(line)
                    log.write(line)
                elif proc.poll() is not None:
                    rest = proc.stdout.read()
                    lines.append(rest)
                    log.write(rest)
                    break
            proc.wait(timeout=30)
            code = None if terminated else proc.returncode
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.write(f"===== {name}: exit {proc.returncode} after {time.time() - start:.0f} s\n")
    return code, "".join(lines)


"""Check a kill-and-resume pair of runs (Lightning or Accelerate) against an uninterrupted run.

    python tests/gpu/check_resume.py --name NAME --ckpt P --rc-a RC --log-a A.log --log-b B.log \
        --out-b B.pt --out-c C.pt [--resume-step 4 --final-step 8 --interval 2]

Run A was SIGKILLed after step ``resume-step + 1``; run B reran the same command up to
``final-step`` and must resume from ``global_step_{resume-step}``; run C ran uninterrupted into
another directory. Prints PASS/FAIL lines (see common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re

import common as C
import torch


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _err_tail(log: str) -> str:
    lines = [ln for ln in log.splitlines() if re.search(r"(Error|Exception|error:)", ln) and "Warning" not in ln]
    return " | ".join(lines[-3:])[-600:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--rc-a", type=int, required=True)
    ap.add_argument("--rc-b", type=int, default=0)
    ap.add_argument("--log-a", required=True)
    ap.add_argument("--log-b", required=True)
    ap.add_argument("--out-b", required=True)
    ap.add_argument("--out-c", required=True)
    ap.add_argument("--resume-step", type=int, default=4)
    ap.add_argument("--final-step", type=int, default=8)
    ap.add_argument("--interval", type=int, default=2)
    a = ap.parse_args()
    n = a.name
    log_a, log_b = _read(a.log_a), _read(a.log_b)

    saved_a = sorted(int(s) for s in re.findall(r"\[skyrl-ckpt\] step (\d+):", log_a))
    want_a = list(range(a.interval, a.resume_step + 1, a.interval))
    C.report(f"{n}_run_killed", a.rc_a != 0 and saved_a == want_a,
             f"run A exit code {a.rc_a} (SIGKILL expected), saved steps {saved_a} (want {want_a})"
             + ("" if saved_a == want_a else f"; errors: {_err_tail(log_a)}"))

    m = re.search(r"\[skyrl-ckpt\] resumed from (\S+); continuing at step (\d+)", log_b)
    ok = bool(m) and m.group(1).rstrip("/").endswith(f"global_step_{a.resume_step}") and int(m.group(2)) == a.resume_step + 1
    C.report(f"{n}_resumed_line", ok and a.rc_b == 0,
             (m.group(0) if m else "no '[skyrl-ckpt] resumed from' line") + f"; run B exit code {a.rc_b}"
             + ("" if ok and a.rc_b == 0 else f"; errors: {_err_tail(log_b)}"))

    out_b = torch.load(a.out_b, weights_only=False) if os.path.exists(a.out_b) else None
    out_c = torch.load(a.out_c, weights_only=False) if os.path.exists(a.out_c) else None
    saved_b = sorted(int(s) for s in re.findall(r"\[skyrl-ckpt\] step (\d+):", log_b))
    want_b = list(range(a.resume_step + a.interval, a.final_step + 1, a.interval))
    if out_b is None:
        C.report(f"{n}_step_continues", False, f"run B wrote no final state; saves in run B {saved_b}")
    else:
        C.report(f"{n}_step_continues",
                 out_b["step"] == a.final_step and out_b["resumed_step"] == a.resume_step and saved_b == want_b,
                 f"final step {out_b['step']}, resumed_step {out_b['resumed_step']}, saves in run B {saved_b} "
                 f"(want {want_b}); writer {out_b.get('writer')}")

    step_dir = os.path.join(a.ckpt, f"global_step_{a.final_step}", "policy")
    cfg_path = os.path.join(step_dir, "fsdp_config.json")
    files = sorted(os.listdir(step_dir)) if os.path.isdir(step_dir) else []
    if os.path.exists(cfg_path):
        cfg = json.load(open(cfg_path))
        C.report(f"{n}_fsdp_config", cfg.get("world_size") == 2,
                 f"global_step_{a.final_step}/policy/fsdp_config.json: {cfg}; policy/ holds {files}")
    else:
        C.report(f"{n}_fsdp_config", False, f"no fsdp_config.json in global_step_{a.final_step}/policy (holds {files})")

    if out_b is None or out_c is None:
        C.report(f"{n}_exact_resume", False, f"missing final state (run B {out_b is not None}, run C {out_c is not None})")
    else:
        problems = C.diff(out_b["policy"], out_c["policy"]) if out_b["policy"] else ["run B saved no policy weights"]
        detail = (f"{len(out_b['policy'])} weights bitwise equal to the uninterrupted run" if not problems else
                  f"differs from the uninterrupted run: max abs diff {C.max_abs_diff(out_b['policy'], out_c['policy']):.3g}; "
                  + "; ".join(problems[:3]))
        C.report(f"{n}_exact_resume", not problems, detail)


if __name__ == "__main__":
    main()

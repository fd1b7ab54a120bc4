#!/usr/bin/env bash
# Megatron writer checks on 2 GPUs (NCCL), printing "[gpu] PASS/FAIL megatron_..." lines and a summary;
# exits non-zero when anything failed.
#
#   bash tests/gpu/run_megatron.sh [--work DIR] [--out DIR] [--only core,distopt,examples]
#
# megatron-core is not installed on the GPU machine: carry its wheel in .whl/ (see docs/megatron.md):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.16.1
# and this script installs it into /tmp/site (no index, no deps: numpy/packaging/torch are there; see
# tests/gpu/megatron_env.sh, shared with run_megatron_scale.sh).
#
# Cases (all through torchrun, one process per GPU):
#   core     tests/megatron_worker.py save2 (2 GPUs: TP2 save via CheckpointManager, same-layout load, per-rank
#            RNG incl. the CUDA RNG tracker, async hooks, mismatch errors, HF export logits at TP2, PP2 and DP2
#            saves), load1 (1 GPU: TP2->1, PP2->1, DP2->1 bitwise, TP1 save), load2 (2 GPUs: TP1->TP2)
#   distopt  megatron DDP + DistributedOptimizer: fully_reshardable and dp_reshardable round trips at TP2,
#            TP2->TP1 with the optimizer (fully_reshardable), dp_reshardable TP2->TP1 refused clearly
#   solo     one GPU (when no 2-GPU machine is lent): DistributedOptimizer TP1/DP1 round trips in both
#            shardings (own step per parameter, next step bitwise), examples/megatron_torchrun.py kill/resume
#            vs straight in both shardings, examples/megatron_lightning.py kill/resume, all at 1 process
#            (env SOLO_SHARDINGS="dp_reshardable" and SOLO_LIGHTNING=0 narrow it)
#   examples examples/megatron_torchrun.py (TP2: kill at step 5, resume to 8, compare with a straight run;
#            then resume at TP1 from the TP2 checkpoint) and examples/megatron_lightning.py (TP2, kill + resume)
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK=/tmp/skyrl_megatron_gpu; OUTDIR=""; ONLY="core,distopt,examples"
while [ $# -gt 0 ]; do
  case "$1" in
    --work) WORK="$2"; shift 2;;
    --out) OUTDIR="$2"; shift 2;;
    --only) ONLY="$2"; shift 2;;
    *) echo "unknown argument $1"; exit 2;;
  esac
done
# NCCL settings (NVLink multicast off) and the megatron-core wheel: shared with run_megatron_scale.sh
. "$HERE/megatron_env.sh"
megatron_gpu_env
megatron_install_wheel gpu || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$WORK"; mkdir -p "$WORK/logs"
export GPU_RESULTS="$WORK/results.jsonl"; : > "$GPU_RESULTS"
T_ALL=$(date +%s)
{
  echo "date: $(date -u +%FT%TZ)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, megatron.core as m, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'megatron-core', m.__version__, 'transformers', transformers.__version__)"
} > "$WORK/env.txt" 2>&1
sed 's/^/[env] /' "$WORK/env.txt"

record() {  # name ok(true|false) detail
  python3 - "$1" "$2" "$3" <<'PY'
import json, os, sys
name, ok, detail = sys.argv[1], sys.argv[2] == "true", sys.argv[3]
print(f"[gpu] {'PASS' if ok else 'FAIL'} {name}: {detail[:400]}", flush=True)
with open(os.environ["GPU_RESULTS"], "a") as fh:
    fh.write(json.dumps({"name": name, "ok": ok, "detail": detail[:2000]}) + "\n")
PY
}

# launch NAME NPROC TIMEOUT EXPECT(0|nonzero) args...  -> LAST_RC; the worker's own PASS/FAIL lines are shown
launch() {
  local name="$1" nproc="$2" tmo="$3" expect="$4"; shift 4
  local log="$WORK/logs/$name.log"
  local t0=$(date +%s)
  timeout -k 10 "$tmo" torchrun --standalone --nproc_per_node "$nproc" "$@" > "$log" 2>&1
  LAST_RC=$?
  grep -a '^\[gpu\] \|^\[example\]' "$log" | sed "s/^\[example\]/  ($name) [example]/"
  echo "[gpu] TIME $name: $(( $(date +%s) - t0 )) s (exit code $LAST_RC)"
  if { [ "$expect" = 0 ] && [ "$LAST_RC" != 0 ]; } || { [ "$expect" = nonzero ] && [ "$LAST_RC" = 0 ]; }; then
    local tail
    tail=$(grep -a 'Error\|Exception\|FAIL' "$log" | grep -v Warning | tail -5 | tr '\n' '|')
    record "megatron_launch_$name" false "exit code $LAST_RC (expected $expect): ${tail:0:1500}"
  fi
}

worker_results() {  # phase nproc: fold the worker's JSON results into results.jsonl
  python3 - "$WORK/core" "$1" "$2" <<'PY'
import json, os, sys
work, phase, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.environ["GPU_RESULTS"], "a") as out:
    for r in range(n):
        p = os.path.join(work, f"results_{phase}_rank{r}.json")
        if not os.path.exists(p):
            out.write(json.dumps({"name": f"megatron_{phase}_rank{r}_results", "ok": False, "detail": "no results file"}) + "\n")
            continue
        for it in json.load(open(p)):
            if r == 0 or not it["ok"]:
                out.write(json.dumps({"name": f"megatron_{it['name']}" + ("" if r == 0 else f"_rank{r}"), "ok": it["ok"],
                                      "detail": it["detail"][:2000]}) + "\n")
PY
}

has() { case ",$ONLY," in *,"$1",*) return 0;; esac; return 1; }

if has core; then
  echo "=== core: TP2 save/load, per-rank RNG, async hooks, errors, HF export; TP2->1, PP2->1, DP2->1, TP1->2"
  mkdir -p "$WORK/core"
  launch core_save2 2 240 0 "$REPO/tests/megatron_worker.py" save2 "$WORK/core"; worker_results save2 2
  launch core_load1 1 150 0 "$REPO/tests/megatron_worker.py" load1 "$WORK/core"; worker_results load1 1
  launch core_load2 2 150 0 "$REPO/tests/megatron_worker.py" load2 "$WORK/core"; worker_results load2 2
fi

if has distopt; then
  echo "=== distopt: megatron DDP + DistributedOptimizer, fully_reshardable / dp_reshardable, TP2->TP1"
  mkdir -p "$WORK/core"
  launch distopt_gpu2 2 180 0 "$REPO/tests/megatron_worker.py" gpu2 "$WORK/core"; worker_results gpu2 2
  launch distopt_gpu1 1 150 0 "$REPO/tests/megatron_worker.py" gpu1 "$WORK/core"; worker_results gpu1 1
fi

if has solo; then
  echo "=== solo (1 GPU): DistributedOptimizer round trips at TP1/DP1; examples kill/resume at 1 process"
  mkdir -p "$WORK/core"
  launch solo_distopt 1 150 0 "$REPO/tests/megatron_worker.py" solo "$WORK/core"; worker_results solo 1
fi

compare() {  # name a.pt b.pt tol
  python3 - "$@" <<'PY'
import json, os, sys, torch
name, a, b, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ok, detail = False, ""
try:
    A, B = torch.load(a), torch.load(b)
    assert set(A) == set(B), f"keys differ: {sorted(set(A) ^ set(B))[:5]}"
    worst = max((A[k].float() - B[k].float()).abs().max().item() for k in A)
    ok = worst <= tol
    detail = f"{len(A)} tensors, max |d| {worst:.3e} (tolerance {tol:g})"
except Exception as exc:
    detail = f"{type(exc).__name__}: {exc}"
print(f"[gpu] {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
with open(os.environ["GPU_RESULTS"], "a") as fh:
    fh.write(json.dumps({"name": name, "ok": ok, "detail": detail}) + "\n")
PY
}

if has examples; then
  echo "=== examples: megatron_torchrun.py (TP2 kill/resume, resume at TP1), megatron_lightning.py (kill/resume)"
  E="$WORK/examples"; mkdir -p "$E"
  X="$REPO/examples/megatron_torchrun.py"
  launch ex_torchrun_A_killed 2 150 nonzero "$X" --tp 2 --steps 8 --ckpt-interval 2 --ckpt-path "$E/tr" --kill-at-step 5
  launch ex_torchrun_B_resume 2 150 0 "$X" --tp 2 --steps 8 --ckpt-interval 2 --ckpt-path "$E/tr" --out "$E/tr_B.pt"
  grep -q "resumed from .*global_step_4" "$WORK/logs/ex_torchrun_B_resume.log" \
    && record megatron_example_torchrun_resumed_from_step_4 true "resumed from global_step_4" \
    || record megatron_example_torchrun_resumed_from_step_4 false "no 'resumed from ...global_step_4' line"
  launch ex_torchrun_C_straight 2 150 0 "$X" --tp 2 --steps 8 --ckpt-interval 2 --ckpt-path "$E/tr_straight" --out "$E/tr_C.pt"
  compare megatron_example_torchrun_resume_equals_straight "$E/tr_B.pt" "$E/tr_C.pt" 0
  # the TP2 checkpoint (DistributedOptimizer, fully_reshardable) resumed at TP1 / DP2
  launch ex_torchrun_D_tp1 2 150 0 "$X" --tp 1 --steps 10 --ckpt-interval 2 --ckpt-path "$E/tr"
  grep -q "TP 1, DP 2; resumed from .*global_step_8" "$WORK/logs/ex_torchrun_D_tp1.log" \
    && record megatron_example_torchrun_tp2_ckpt_resumes_at_tp1_dp2 true "resumed at TP1/DP2 from the TP2 step 8" \
    || record megatron_example_torchrun_tp2_ckpt_resumes_at_tp1_dp2 false "no 'TP 1, DP 2; resumed from ...global_step_8' line"
  L="$REPO/examples/megatron_lightning.py"
fi

if has solo; then
  E="$WORK/examples_solo"; mkdir -p "$E"
  X="$REPO/examples/megatron_torchrun.py"
  for SH in ${SOLO_SHARDINGS:-fully_reshardable dp_reshardable}; do
    launch solo_torchrun_${SH}_A_killed 1 150 nonzero "$X" --tp 1 --steps 8 --ckpt-interval 2 --sharding $SH --ckpt-path "$E/tr_$SH" --kill-at-step 5
    launch solo_torchrun_${SH}_B_resume 1 150 0 "$X" --tp 1 --steps 8 --ckpt-interval 2 --sharding $SH --ckpt-path "$E/tr_$SH" --out "$E/tr_${SH}_B.pt"
    grep -q "resumed from .*global_step_4" "$WORK/logs/solo_torchrun_${SH}_B_resume.log" \
      && record megatron_solo_torchrun_${SH}_resumed_from_step_4 true "resumed from global_step_4" \
      || record megatron_solo_torchrun_${SH}_resumed_from_step_4 false "no 'resumed from ...global_step_4' line"
    launch solo_torchrun_${SH}_C_straight 1 150 0 "$X" --tp 1 --steps 8 --ckpt-interval 2 --sharding $SH --ckpt-path "$E/tr_${SH}_straight" --out "$E/tr_${SH}_C.pt"
    compare megatron_solo_torchrun_${SH}_resume_equals_straight "$E/tr_${SH}_B.pt" "$E/tr_${SH}_C.pt" 0
  done
  L="$REPO/examples/megatron_lightning.py"
  [ "${SOLO_LIGHTNING:-1}" = 1 ] && {
  launch solo_lightning_A_killed 1 150 nonzero "$L" --steps 8 --ckpt-interval 2 --ckpt-path "$E/pl" --kill-at-step 5
  launch solo_lightning_B_resume 1 150 0 "$L" --steps 8 --ckpt-interval 2 --ckpt-path "$E/pl" --out "$E/pl_B.pt"
  launch solo_lightning_C_straight 1 150 0 "$L" --steps 8 --ckpt-interval 2 --ckpt-path "$E/pl_straight" --out "$E/pl_C.pt"
  compare megatron_solo_lightning_resume_equals_straight "$E/pl_B.pt" "$E/pl_C.pt" 0
  }
fi

if has examples; then
  E="$WORK/examples"; L="$REPO/examples/megatron_lightning.py"
  launch ex_lightning_A_killed 2 150 nonzero "$L" --steps 8 --ckpt-interval 2 --ckpt-path "$E/pl" --kill-at-step 5
  launch ex_lightning_B_resume 2 150 0 "$L" --steps 8 --ckpt-interval 2 --ckpt-path "$E/pl" --out "$E/pl_B.pt"
  launch ex_lightning_C_straight 2 150 0 "$L" --steps 8 --ckpt-interval 2 --ckpt-path "$E/pl_straight" --out "$E/pl_C.pt"
  compare megatron_example_lightning_resume_equals_straight "$E/pl_B.pt" "$E/pl_C.pt" 0
fi

python3 - "$GPU_RESULTS" "$(( $(date +%s) - T_ALL ))" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
npass = sum(r["ok"] for r in rows); nfail = len(rows) - npass
print(f"=== megatron summary: {npass} PASS, {nfail} FAIL, {sys.argv[2]} s")
for r in rows:
    if not r["ok"]:
        print(f"  FAIL {r['name']}: {r['detail'][:600]}")
PY
if [ -n "$OUTDIR" ]; then
  mkdir -p "$OUTDIR"
  cp "$GPU_RESULTS" "$WORK/env.txt" "$OUTDIR/" 2>/dev/null
  tar -C "$WORK" -czf "$OUTDIR/megatron_logs.tar.gz" logs
fi
grep -q '"ok": false' "$GPU_RESULTS" && exit 1 || exit 0

#!/usr/bin/env bash
# Megatron scale check (issue 10, point 2), one command:
#
#   bash tests/gpu/run_megatron_scale.sh --nproc 8 --out DIR [--model 1b|7b|small|tiny] [--distopt] [--work DIR]
#   bash tests/gpu/run_megatron_scale.sh --cpu [--out DIR]          # small version on gloo (CPU shims)
#   --phase save | --phase load: only the save, or only the loads of an earlier save in the same --work (to split the
#   run over two device commands of at most 10 minutes each); SCALE_TIMEOUT=590 bounds each torchrun (s)
#
# 8 GPUs (NCCL, torchrun, one process per GPU; megatron-core from the carried .whl, see megatron_env.sh):
#   save  TP2 x PP2 x DP2 (8 ranks): CheckpointManager saves step 1 (the process's first save), step 2 (sync),
#         step 3 (async, training goes on, polled each step); the gathered full tensors of steps 2 and 3
#         (weights and AdamW state) hashed as references
#   load  TP1 x PP1 x DP2 (2 ranks) and TP4 x PP1 x DP2 (8 ranks): resume steps 2 and 3, gathered full tensors
#         bitwise equal to the references (sha256), one more training step
# --cpu: save TP2 x PP2 x DP1 (4 ranks), load TP1 x PP1 x DP1 (1 rank) and TP2 x PP1 x DP2 (4 ranks), model tiny.
# Other layouts: SAVE_LAYOUT="TP,PP,NPROC" LOAD_LAYOUTS="TP,PP,NPROC TP,PP,NPROC ..." (DP = NPROC / (TP*PP)).
#
# Prints "[scale] PASS/FAIL ..." lines, a summary and a markdown table of the figures (per-rank and aggregate
# write GB/s, training-loop stall, total time), also written to OUT/scale_table.md with results.jsonl,
# figures_*.json and the logs. Exits non-zero when anything failed.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK=/tmp/skyrl_megatron_scale; OUTDIR=""; NPROC=8; CPU=0; MODEL=""; DISTOPT=""; STEP_TIME=""; PHASE=all
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2;;
    --out) OUTDIR="$2"; shift 2;;
    --work) WORK="$2"; shift 2;;
    --cpu) CPU=1; shift;;
    --model) MODEL="$2"; shift 2;;
    --distopt) DISTOPT="--distopt"; shift;;
    --step-time) STEP_TIME="$2"; shift 2;;
    --phase) PHASE="$2"; shift 2;;
    -h|--help) sed -n '2,22p' "$0"; exit 0;;
    *) echo "unknown argument $1"; exit 2;;
  esac
done
. "$HERE/megatron_env.sh"
megatron_gpu_env
if [ "$CPU" = 1 ]; then
  export OMP_NUM_THREADS=1
  MODEL="${MODEL:-tiny}"; STEP_TIME="${STEP_TIME:-0.2}"
  SAVE_LAYOUT="${SAVE_LAYOUT:-2,2,4}"; LOAD_LAYOUTS="${LOAD_LAYOUTS:-1,1,1 2,1,4}"
  [ -n "$DISTOPT" ] && { echo "[scale] FAIL args: --distopt needs CUDA"; exit 2; }
else
  megatron_install_wheel scale || exit 1
  MODEL="${MODEL:-1b}"; STEP_TIME="${STEP_TIME:-1.0}"
  SAVE_LAYOUT="${SAVE_LAYOUT:-2,2,$NPROC}"; LOAD_LAYOUTS="${LOAD_LAYOUTS:-1,1,2 4,1,$NPROC}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
case "$PHASE" in all|save|load) ;; *) echo "--phase must be all, save or load"; exit 2;; esac
TMO="${SCALE_TIMEOUT:-590}"
if [ "$PHASE" = load ]; then  # keep the save's checkpoints, references, figures and results
  mkdir -p "$WORK/logs"; touch "$WORK/results.jsonl"
  python3 - "$WORK/results.jsonl" <<'PY'
import json, sys
rows = [l for l in open(sys.argv[1]) if l.strip() and not json.loads(l)["name"].startswith("load_")]
open(sys.argv[1], "w").writelines(rows)
PY
  rm -f "$WORK"/figures_load_*.json "$WORK"/results_load_*.json
else
  rm -rf "$WORK"; mkdir -p "$WORK/logs"; : > "$WORK/results.jsonl"
fi
export SCALE_RESULTS="$WORK/results.jsonl"
T_ALL=$(date +%s)
{
  echo "date: $(date -u +%FT%TZ)  mode: $([ "$CPU" = 1 ] && echo cpu/gloo || echo gpu/nccl)  model: $MODEL $DISTOPT"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'megatron-core', m.__version__)"
  df -h "$WORK" | tail -1
} > "$WORK/env.txt" 2>&1
sed 's/^/[env] /' "$WORK/env.txt"

S="$REPO/tests/gpu/megatron_scale.py"
# launch TAG PHASE TP PP NPROC TIMEOUT
launch() {
  local tag="$1" phase="$2" tp="$3" pp="$4" n="$5" tmo="$6" log="$WORK/logs/$1.log" t0 rc
  t0=$(date +%s)
  echo "=== $tag: $phase at TP$tp x PP$pp x DP$(( n / (tp * pp) )) ($n ranks, model $MODEL)"
  if [ "$CPU" = 1 ]; then
    timeout -k 10 "$tmo" python3 "$S" "$phase" "$WORK" --tp "$tp" --pp "$pp" --nproc "$n" --model "$MODEL" \
      --tag "$tag" --step-time "$STEP_TIME" > "$log" 2>&1
  else
    timeout -k 10 "$tmo" torchrun --standalone --nproc_per_node "$n" "$S" "$phase" "$WORK" --tp "$tp" --pp "$pp" \
      --model "$MODEL" --tag "$tag" --step-time "$STEP_TIME" $DISTOPT > "$log" 2>&1
  fi
  rc=$?
  grep -a '^\[scale\]' "$log"
  echo "[scale] TIME $tag: $(( $(date +%s) - t0 )) s (exit code $rc)"
  python3 - "$WORK" "$tag" "$n" "$rc" "$log" <<'PY'
import json, os, sys
work, tag, n, rc, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = []
for r in range(n):
    p = os.path.join(work, f"results_{tag}_rank{r}.json")
    if not os.path.exists(p):
        rows.append({"name": f"{tag}_rank{r}_results", "ok": False, "detail": f"no results file (exit code {rc})"})
        continue
    for it in json.load(open(p)):
        if r == 0 or not it["ok"]:
            rows.append({"name": it["name"] + ("" if r == 0 else f"_rank{r}"), "ok": it["ok"], "detail": it["detail"][:2000]})
if rc != 0 and all(r["ok"] for r in rows):
    tail = [l.strip() for l in open(log, errors="replace") if "Error" in l or "Exception" in l][-4:]
    rows.append({"name": f"{tag}_exit", "ok": False, "detail": f"exit code {rc}: {' | '.join(tail)[:1500]}"})
    print(f"[scale] FAIL {tag}_exit: exit code {rc}", flush=True)
with open(os.environ["SCALE_RESULTS"], "a") as out:
    for r in rows:
        out.write(json.dumps(r) + "\n")
PY
}

IFS=, read -r STP SPP SN <<< "$SAVE_LAYOUT"
[ "$PHASE" = load ] || launch save save "$STP" "$SPP" "$SN" "$TMO"
if [ "$PHASE" = save ]; then
  :
elif [ -s "$WORK/ref_sync.json" ]; then
  for L in $LOAD_LAYOUTS; do
    IFS=, read -r LTP LPP LN <<< "$L"
    launch "load_tp${LTP}pp${LPP}dp$(( LN / (LTP * LPP) ))" load "$LTP" "$LPP" "$LN" "$TMO"
  done
else
  echo "[scale] FAIL loads: no reference from the save phase"; echo '{"name": "loads", "ok": false, "detail": "no reference"}' >> "$SCALE_RESULTS"
fi

python3 - "$WORK" "$(( $(date +%s) - T_ALL ))" "$MODEL" <<'PY' | tee "$WORK/scale_table.md"
import glob, json, os, statistics, sys
work, total_s, model = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(os.path.join(work, "results.jsonl")) if l.strip()]
npass = sum(r["ok"] for r in rows)
print(f"=== megatron scale summary: {npass} PASS, {len(rows) - npass} FAIL, {total_s} s (model {model})")
for r in rows:
    if not r["ok"]:
        lines = [l for l in r["detail"].splitlines() if l.strip()]
        where = [l.strip() for l in lines[1:] if l.strip().startswith("File ")][-1:]
        print(f"  FAIL {r['name']}: {' | '.join(lines[:1] + where)[:600]}")
f = lambda x, d=2: f"{x:.{d}f}"  # noqa: E731
g3 = lambda x: f"{x:.3g}"  # noqa: E731 - GB/s, 3 significant digits
mb = lambda n: f"{n / 1e6:.1f}"  # noqa: E731
save = os.path.join(work, "figures_save.json")
if os.path.exists(save):
    s = json.load(open(save))
    ranks = s["ranks"]
    print(f"\n### Save at TP{s['tp']} x PP{s['pp']} x DP{s['dp']} ({s['world']} ranks), model `{s['model']}` "
          f"({s['total_params'] / 1e6:.1f} M parameters{', DistributedOptimizer' if s['distopt'] else ', torch AdamW'})\n")
    print("| save | step | checkpoint MB | total s | aggregate GB/s | stall s (max rank) | per-rank write GB/s min / median / max | per-rank MB min / max |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, label in (("sync_first", "sync, first of the process"), ("sync", "sync"), ("async", "async")):
        rs = [r[kind] for r in ranks if kind in r]
        if not rs:
            continue
        g = [r["gbps"] for r in rs]
        b = [r["bytes"] for r in rs]
        step = rs[0].get("step", 3)
        print(f"| {label} | {step} | {mb(rs[0]['total_bytes'])} | {f(max(r['total_s'] for r in rs))} | "
              f"{g3(rs[0]['total_bytes'] / 1e9 / max(r['total_s'] for r in rs))} | {f(max(r['stall_s'] for r in rs))} | "
              f"{g3(min(g))} / {g3(statistics.median(g))} / {g3(max(g))} | {mb(min(b))} / {mb(max(b))} |")
    a = [r["async"] for r in ranks if "async" in r]
    if a:
        print(f"\nasync: snapshot (foreground) max {f(max(x['foreground_s'] for x in a))} s, commit polls max "
              f"{f(max(x['poll_s'] + x['wait_s'] for x in a))} s, {a[0]['overlap_steps']} training steps overlapped "
              f"the background write; the manager's own stall figure {f(max(x['manager_stall_s'] for x in a))} s")
    print("\n| rank | TP | PP | DP | sync MB | sync write s | sync GB/s | async MB | async write s | async GB/s | async stall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in ranks:
        sy, asy = r.get("sync", {}), r.get("async", {})
        print(f"| {r['rank']} | {r['tp_rank']} | {r['pp_rank']} | {r['dp_rank']} | {mb(sy.get('bytes', 0))} | "
              f"{f(sy.get('write_s', 0))} | {g3(sy.get('gbps', 0))} | {mb(asy.get('bytes', 0))} | "
              f"{f(asy.get('write_s', 0))} | {g3(asy.get('gbps', 0))} | {f(asy.get('stall_s', 0))} |")
    sizes = {"sync": ranks[0].get("sync", {}).get("total_bytes", 0), "async": ranks[0].get("async", {}).get("total_bytes", 0)}
    loads = sorted(glob.glob(os.path.join(work, "figures_load_*.json")))
    if loads:
        ok = {r["name"]: r["ok"] for r in rows}
        print("\n| load at | ranks | checkpoint | load s (max rank) | aggregate read GB/s | full tensors bitwise |")
        print("| --- | --- | --- | --- | --- | --- |")
        for p in loads:
            l = json.load(open(p))
            for kind, step in (("sync", 2), ("async", 3)):
                ts = [r[kind]["load_s"] for r in l["ranks"] if kind in r]
                if not ts:
                    continue
                name = f"{l['tag']}_{kind}_step{step}_bitwise"
                verdict = "PASS" if ok.get(name) else "FAIL"
                print(f"| TP{l['tp']} x PP{l['pp']} x DP{l['dp']} | {l['world']} | step {step} ({kind}) | {f(max(ts))} | "
                      f"{g3(sizes[kind] / 1e9 / max(ts))} | {verdict} |")
print(f"\ntotal time of the run: {total_s} s")
PY

if [ -n "$OUTDIR" ]; then
  mkdir -p "$OUTDIR"
  cp "$SCALE_RESULTS" "$WORK/env.txt" "$WORK/scale_table.md" "$WORK"/figures_*.json "$OUTDIR/" 2>/dev/null
  tar -C "$WORK" -czf "$OUTDIR/megatron_scale_logs.tar.gz" logs
fi
grep -q '"ok": false' "$SCALE_RESULTS" && exit 1 || exit 0

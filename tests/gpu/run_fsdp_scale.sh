#!/usr/bin/env bash
# FSDP scale check (issue 10, points 1 and 3) as one command:
#
#   bash tests/gpu/run_fsdp_scale.sh [--nproc 8] [--params-b 3] [--work DIR] [--out DIR]   # NCCL, one GPU per rank
#   bash tests/gpu/run_fsdp_scale.sh --cpu                                                   # gloo smoke run (2 ranks, tiny model)
#
# Save at N ranks (sync + async, HF export with per-rank peak host RSS), then load at N, N/2, N/4 (down to 1)
# and compare every gathered weight and AdamW tensor bitwise with the saving run (bench/scale_fsdp.py).
# Prints "[scale] PASS/FAIL ..." lines and a markdown table; exits non-zero when anything failed.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
NPROC=""; PARAMS=""; WORK=/tmp/skyrl_fsdp_scale; OUTDIR=""; CPU=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2;;
    --params-b) PARAMS="$2"; shift 2;;
    --work) WORK="$2"; shift 2;;
    --out) OUTDIR="$2"; shift 2;;
    --cpu) CPU="--cpu"; shift;;
    *) echo "unknown argument $1"; exit 2;;
  esac
done
if [ -n "$CPU" ]; then
  NPROC=${NPROC:-2}; PARAMS=${PARAMS:-0.02}; export OMP_NUM_THREADS=1
else
  NPROC=${NPROC:-$(python3 -c "import torch; print(torch.cuda.device_count())")}; PARAMS=${PARAMS:-3}
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
rm -rf "$WORK"; mkdir -p "$WORK/logs"
T_ALL=$(date +%s); RC=0
run() {  # name nproc args...
  local name="$1" n="$2"; shift 2
  local t0=$(date +%s)
  torchrun --standalone --nproc_per_node "$n" "$REPO/bench/scale_fsdp.py" "$@" --params-b "$PARAMS" --dir "$WORK" $CPU \
    > "$WORK/logs/$name.log" 2>&1 || { RC=1; echo "[scale] FAIL $name: exit code $? (log: $WORK/logs/$name.log)"; \
    grep -a "Error\|error" "$WORK/logs/$name.log" | tail -5; }
  grep -a '^\[scale\]' "$WORK/logs/$name.log"
  echo "[scale] TIME $name: $(( $(date +%s) - t0 )) s"
}
run "save_$NPROC" "$NPROC" save --export
N=$NPROC
while [ "$N" -ge 1 ]; do
  run "load_$N" "$N" load
  [ "$N" -le 2 ] && [ "$N" -lt "$NPROC" ] && break
  N=$(( N / 2 ))
done
python3 - "$WORK/results.jsonl" "$(( $(date +%s) - T_ALL ))" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()] if __import__("os").path.exists(sys.argv[1]) else []
print(f"\n| check | ranks | seconds | aggregate GB/s | detail |\n|---|---|---|---|---|")
for r in rows:
    g = f"{r['agg_gbps']:.2f}" if "agg_gbps" in r else "-"
    print(f"| {r['name']} | {r['world']} | {r.get('seconds', 0):.2f} | {g} | {'PASS' if r['ok'] else 'FAIL'}: {r['detail']} |")
nfail = sum(not r["ok"] for r in rows)
print(f"=== fsdp scale summary: {len(rows) - nfail} PASS, {nfail} FAIL, {sys.argv[2]} s")
PY
grep -q '"ok": false' "$WORK/results.jsonl" 2>/dev/null && RC=1
if [ -n "$OUTDIR" ]; then mkdir -p "$OUTDIR"; cp "$WORK/results.jsonl" "$OUTDIR/fsdp_scale_results.jsonl"; tar -C "$WORK" -czf "$OUTDIR/fsdp_scale_logs.tar.gz" logs; fi
exit $RC

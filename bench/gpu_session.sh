#!/usr/bin/env bash
# One GPU session (one H100 or H200, < 9 minutes): the end-to-end and resume benches of issue 20, the
# async_overlap_copy bitwise check, and the re-measure of bench_save.py. Everything lands under $OUT:
#
#   session.log     every section's output (env first), with [session] TIME lines
#   results.jsonl   PASS/FAIL lines of tests/gpu/overlap_check.py
#   training.json   bench/bench_training.py (GPU, ~1B parameters, 7 modes)
#   resume.json     bench/bench_resume.py (GPU, ~1B parameters, local disk)
#   save.json       bench/bench_save.py --device cuda at 2 and 8 GiB (sync vs raw dump, async stall vs pinned
#                   copy, load vs cold raw read)
#
#   OUT=/some/dir bash bench/gpu_session.sh [--only overlap,training,resume,save] [--work DIR] [--quick]
#
# The GPU machine is bare apart from its Python (torch, lightning, transformers, accelerate, fsspec, ...: see
# docs/gpu_runs.md); like tests/gpu/run_all.sh this runs the package from the repository (PYTHONPATH), and,
# like tests/gpu/megatron_env.sh, installs carried wheels (.whl/*.whl, no index, no deps, into /tmp/site)
# only when an import is missing. --quick: smaller sizes (a smoke run of the script, ~3 minutes); --cpu: tiny
# sizes on a CPU machine (checks the script's plumbing; `OUT=/tmp/s bash bench/gpu_session.sh --cpu`).
# Budget (H100, estimated): overlap 1 min, training 4 min, resume 1.5 min, save 2 min.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
: "${OUT:?set OUT to the output folder}"
ONLY="overlap,training,resume,save"; WORK=/tmp/skyrl_gpu_session; QUICK=0; CPU=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="$2"; shift 2;;
    --work) WORK="$2"; shift 2;;
    --quick) QUICK=1; shift;;
    --cpu) CPU=1; shift;;
    *) echo "unknown argument $1"; exit 2;;
  esac
done
mkdir -p "$OUT"; rm -rf "$WORK"; mkdir -p "$WORK"
LOG="$OUT/session.log"; : > "$LOG"
# the settings of tests/gpu/run_all.sh (NVLink multicast never used; offline)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
export GPU_RESULTS="$OUT/results.jsonl"; : > "$GPU_RESULTS"
cd "$REPO"
T_ALL=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }
{
  echo "=== env"; echo "date: $(date -u +%FT%TZ)"; uname -a; git log --oneline -1 2>/dev/null
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, lightning, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); print('lightning', lightning.__version__, 'transformers', transformers.__version__)"
  nproc; free -g | head -2; df -h /tmp | tail -1
} >> "$LOG" 2>&1

# imports the benches need; a missing one is installed from carried wheels, else the section fails clearly
if ! python3 -c "import torch, lightning, transformers, fsspec, skyrl_callbacks" >> "$LOG" 2>&1; then
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    say "[session] installing carried wheels from .whl/ into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$REPO"/.whl/*.whl >> "$LOG" 2>&1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  python3 -c "import torch, lightning, transformers, fsspec, skyrl_callbacks" >> "$LOG" 2>&1 \
    || { say "[session] FAIL imports: see $LOG"; exit 1; }
fi

has() { case ",$ONLY," in *,"$1",*) return 0;; esac; return 1; }
section() {  # NAME TIMEOUT cmd...
  local name="$1" tmo="$2"; shift 2
  local t0=$(date +%s)
  say "=== $name: $*"
  timeout -k 10 "$tmo" "$@" 2>&1 | grep -av 'Tip:\|litlogger\|GPU available\|TPU available\|LOCAL_RANK\|stopped: `max_steps' >> "$LOG"
  local rc=${PIPESTATUS[0]}
  say "[session] TIME $name: $(( $(date +%s) - t0 )) s (exit code $rc)"
}

DEV=(--device cuda); DROP=(--drop-caches)
if [ "$CPU" = 1 ]; then  # smoke test of this script on a CPU machine: tiny sizes, no global cache drop
  OV=(--device cpu --only plain); TR=(--cpu --tiny --every 3 --saves 1); RS=(--cpu --preset tiny --runs 1); SZ=(0.02)
  DEV=(--device cpu); DROP=()
elif [ "$QUICK" = 1 ]; then
  OV=(--layers 4 --hidden 512); TR=(--layers 4 --saves 1); RS=(--layers 4 --runs 1); SZ=(1 2)
else
  OV=(); TR=(--saves 1); RS=(--runs 2); SZ=(2 8)
fi
if has overlap; then
  section overlap 120 python3 tests/gpu/overlap_check.py --control --work "$WORK" "${OV[@]}"
fi
if has training; then
  section training 330 python3 bench/bench_training.py --dir "$WORK" --out "$OUT/training.json" "${TR[@]}"
fi
if has resume; then
  section resume 150 python3 bench/bench_resume.py "${DROP[@]}" --dir "$WORK" --out "$OUT/resume.json" "${RS[@]}"
fi
if has save; then
  section save 240 python3 bench/bench_save.py "${DEV[@]}" --sizes-gib "${SZ[@]}" --runs 2 --dir "$WORK" \
    --methods raw "pinned copy" ours "ours async" "ours load" --json "$OUT/save.json"
fi
rm -rf "$WORK"
say "=== summary: $(grep -c '"ok": true' "$GPU_RESULTS") PASS, $(grep -c '"ok": false' "$GPU_RESULTS") FAIL, $(( $(date +%s) - T_ALL )) s"
grep -a '^\[gpu\] \(PASS\|FAIL\)\|^| \|^N = \|^\[session\]\|^\[bench_\|^S3 resume' "$LOG"
grep -q '"ok": false' "$GPU_RESULTS" && exit 1 || exit 0

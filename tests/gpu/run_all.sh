#!/usr/bin/env bash
# Runs every GPU check of tests/gpu/ and prints PASS/FAIL lines plus a summary.
#
#   bash tests/gpu/run_all.sh [--backend nccl|gloo] [--device cuda|cpu] [--work DIR] [--out DIR]
#                             [--only fsdp2,export,lightning,lightning_fsdpstrategy,lightning_policywrap,accelerate]
#
# Sections: lightning = FSDPStrategy() defaults, FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}) and
# ModelParallelStrategy; lightning_fsdpstrategy = the three Lightning FSDPStrategy (FSDP1) cases alone
# (defaults, decoder-layer auto-wrap, decoder layers + LlamaForCausalLM); lightning_policywrap = the
# last of these alone.
#
# Defaults: NCCL on 2 GPUs, work dir /tmp/skyrl_gpu_work. On a CPU-only machine use
# `--backend gloo --device cpu` (Lightning refuses FSDPStrategy on CPU, so lightning_fsdp.py wraps
# with a device_id=cpu subclass there; accelerate's FSDP plugin is ignored on CPU, so that case
# only exercises the script there). With --out, the results
# (results.jsonl, env.txt, logs.tar.gz) are copied there.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BACKEND=nccl; DEVICE=cuda; WORK=/tmp/skyrl_gpu_work; OUTDIR=""; ONLY="fsdp2,export,lightning,lightning_policywrap,accelerate"
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) BACKEND="$2"; shift 2;;
    --device) DEVICE="$2"; shift 2;;
    --work) WORK="$2"; shift 2;;
    --out) OUTDIR="$2"; shift 2;;
    --only) ONLY="$2"; shift 2;;
    *) echo "unknown argument $1"; exit 2;;
  esac
done
# never use NVLink multicast (see the device notes); keep these also for child processes
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore
rm -rf "$WORK"; mkdir -p "$WORK/logs"
export GPU_RESULTS="$WORK/results.jsonl"; : > "$GPU_RESULTS"
COMMON=(--backend "$BACKEND" --device "$DEVICE")
T_ALL=$(date +%s%N)

{
  echo "date: $(date -u +%FT%TZ)"; uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  command -v nvidia-smi >/dev/null && nvidia-smi topo -m 2>/dev/null | head -5
  python3 -c "import sys, torch, lightning, accelerate, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None, 'gpus', torch.cuda.device_count()); print('lightning', lightning.__version__, 'accelerate', accelerate.__version__, 'transformers', transformers.__version__)"
  nproc; free -g | head -2
} > "$WORK/env.txt" 2>&1
sed 's/^/[env] /' "$WORK/env.txt"

fail_line() {  # name detail
  python3 - "$1" "$2" <<'PY'
import json, os, sys
name, detail = sys.argv[1], sys.argv[2]
print(f"[gpu] FAIL {name}: {detail}", flush=True)
with open(os.environ["GPU_RESULTS"], "a") as fh:
    fh.write(json.dumps({"name": name, "ok": False, "detail": detail[:2000]}) + "\n")
PY
}

# launch NAME NPROC TIMEOUT EXPECT_RC(0|any|nonzero) script args...   -> sets LAST_RC
launch() {
  local name="$1" nproc="$2" tmo="$3" expect="$4"; shift 4
  local log="$WORK/logs/$name.log" t0 t1
  t0=$(date +%s%N)
  timeout -k 10 "$tmo" torchrun --standalone --nproc_per_node "$nproc" "$@" > "$log" 2>&1
  LAST_RC=$?
  t1=$(date +%s%N)
  grep -a '^\[gpu\]\|^\[skyrl-ckpt\]' "$log" | grep -v '^\[gpu\] \(PASS\|FAIL\)' | sed "s/^/  ($name) /"
  grep -a '^\[gpu\] \(PASS\|FAIL\)' "$log"
  local ms=$(( (t1 - t0) / 1000000 ))
  printf '[gpu] TIME %s: %d.%01d s (exit code %s)\n' "$name" $((ms / 1000)) $(((ms % 1000) / 100)) "$LAST_RC"
  if { [ "$expect" = 0 ] && [ "$LAST_RC" != 0 ]; } || { [ "$expect" = nonzero ] && [ "$LAST_RC" = 0 ]; }; then
    local tail
    tail=$(grep -a -v 'Warning\|warn(\|elastic\|error_file\|traceback :\|ChildFailedError' "$log" \
           | grep -a 'Error\|Exception\|exitcode\|Killed\|Signal' | tail -6 | tr '\n' '|')
    fail_line "launch_$name" "exit code $LAST_RC (expected $expect): ${tail:0:1500}"
  fi
}

has() { case ",$ONLY," in *,"$1",*) return 0;; esac; return 1; }

# ------------------------------------------------------------------ case 1: FSDP2 + CheckpointManager
if has fsdp2; then
  echo "=== case 1: FSDP2 (fully_shard) tiny Llama, CheckpointManager, reshard 2->1, 1->2, 2->2, full 2->2 (+ case 4 small export)"
  W="$WORK/fsdp2"; mkdir -p "$W"
  launch fsdp2_save2 2 180 0 "$HERE/fsdp2_manager.py" --phase save2 --work "$W" "${COMMON[@]}"
  launch fsdp2_load1 1 180 0 "$HERE/fsdp2_manager.py" --phase load1 --work "$W" "${COMMON[@]}"
  launch fsdp2_load2 2 180 0 "$HERE/fsdp2_manager.py" --phase load2 --work "$W" "${COMMON[@]}"
fi

# ------------------------------------------------------------------ case 4: HF export memory, bigger model
if has export; then
  echo "=== case 4: HF export from a 2-rank FSDP2 model (~0.5B params): memory, from_pretrained logits"
  W="$WORK/export"; mkdir -p "$W"
  SMALL=(); [ "$DEVICE" = cpu ] && SMALL=(--small)
  # mmap threshold fixed: freed tensors go back to the OS, so RSS shows what is alive
  MALLOC_MMAP_THRESHOLD_=131072 launch export_big 2 300 0 "$HERE/fsdp2_manager.py" --phase export_big --work "$W" \
    "${COMMON[@]}" "${SMALL[@]}"
fi

# kill at step 5 (saves at 2, 4), rerun to 8 (resume from 4), uninterrupted run to 8, compare
resume_case() {  # name script args...
  local name="$1"; shift
  local W="$WORK/$name"; mkdir -p "$W"
  launch "${name}_A_killed" 2 150 nonzero "$@" --work "$W" --ckpt-path "$W/ckpt" --steps 6 --kill-at-step 5 --out "$W/A.pt" "${COMMON[@]}"
  local rca=$LAST_RC
  launch "${name}_B_resume" 2 150 0 "$@" --work "$W" --ckpt-path "$W/ckpt" --steps 8 --out "$W/B.pt" "${COMMON[@]}"
  local rcb=$LAST_RC
  launch "${name}_C_straight" 2 150 0 "$@" --work "$W" --ckpt-path "$W/ckpt_straight" --steps 8 --out "$W/C.pt" "${COMMON[@]}"
  python3 "$HERE/check_resume.py" --name "$name" --ckpt "$W/ckpt" --rc-a "$rca" --rc-b "$rcb" \
    --log-a "$WORK/logs/${name}_A_killed.log" --log-b "$WORK/logs/${name}_B_resume.log" --out-b "$W/B.pt" --out-c "$W/C.pt"
}

# ------------------------------------------------------------------ case 2: Lightning
# Lightning's FSDPStrategy (FSDP1 root around the whole LightningModule): the policy is saved as a view
# on the root and must resume bitwise (kill at 5, resume from 4, compare with an uninterrupted run)
if has lightning || has lightning_fsdpstrategy; then
  echo "=== case 2: Lightning + SkyRLCheckpoint: strategy='fsdp' (FSDPStrategy defaults), FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})"
  resume_case lightning_fsdp "$HERE/lightning_fsdp.py" --strategy fsdp
  resume_case lightning_fsdp_wrap "$HERE/lightning_fsdp.py" --strategy fsdp-wrap
fi
if has lightning; then
  echo "=== case 2: Lightning + SkyRLCheckpoint: ModelParallelStrategy (FSDP2)"
  resume_case lightning_modelparallel "$HERE/lightning_fsdp.py" --strategy modelparallel
fi
if has lightning_policywrap || has lightning_fsdpstrategy; then
  echo "=== case 2b: Lightning FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer, LlamaForCausalLM}) (policy unit nested in the root)"
  resume_case lightning_fsdp_wrap_policy "$HERE/lightning_fsdp.py" --strategy fsdp-wrap-policy
fi

# ------------------------------------------------------------------ case 3: accelerate FSDP plugin
if has accelerate; then
  if python3 -c "
import inspect, sys
from skyrl_callbacks.integrations import accelerate as a
src = inspect.getsource(a.bind) + inspect.getsource(a.step) + inspect.getsource(a.finish)
sys.exit(1 if 'NotImplementedError' in src else 0)"; then
    echo "=== case 3: accelerate FSDP plugin (fsdp_version 2 and 1), bind/step/finish, kill + resume"
    resume_case accelerate_fsdp2 "$HERE/accelerate_fsdp.py" --fsdp-version 2
    resume_case accelerate_fsdp1 "$HERE/accelerate_fsdp.py" --fsdp-version 1
  else
    echo "[gpu] SKIP case 3: skyrl_callbacks.integrations.accelerate bind/step/finish raise NotImplementedError"
  fi
fi

# ------------------------------------------------------------------ summary
T_END=$(date +%s%N)
python3 - "$GPU_RESULTS" "$(( (T_END - T_ALL) / 1000000000 ))" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
npass = sum(r["ok"] for r in rows); nfail = len(rows) - npass
print(f"=== summary: {npass} PASS, {nfail} FAIL, {float(sys.argv[2]):.0f} s")
for r in rows:
    if not r["ok"]:
        print(f"  FAIL {r['name']}: {r['detail'][:400]}")
PY
if [ -n "$OUTDIR" ]; then
  mkdir -p "$OUTDIR"
  cp "$GPU_RESULTS" "$WORK/env.txt" "$OUTDIR/" 2>/dev/null
  tar -C "$WORK" -czf "$OUTDIR/logs.tar.gz" logs
fi
grep -q '"ok": false' "$GPU_RESULTS" && exit 1 || exit 0

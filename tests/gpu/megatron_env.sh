# Sourced by tests/gpu/run_megatron.sh and tests/gpu/run_megatron_scale.sh (needs REPO set):
#   megatron_gpu_env            NCCL/threads/offline settings of the GPU runs (exported: child processes keep them)
#   megatron_install_wheel TAG  when megatron.core is missing, install the carried .whl/megatron_core-*.whl into
#                               /tmp/site (no index, no deps: numpy/packaging/torch are on the GPU machine) and put
#                               it on PYTHONPATH; prints "[TAG] FAIL megatron_install: ..." and returns 1 on failure
# The wheel (once, on a machine with an index; /.whl/ is in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl megatron-core==0.16.1

megatron_gpu_env() {
  # never use NVLink multicast (see the device notes); keep these also for child processes
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONWARNINGS=ignore
  export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_DEVICE_MAX_CONNECTIONS=1
  export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: resumed and straight runs compare bitwise
}

megatron_install_wheel() {
  local tag="${1:-gpu}"
  python3 -c "import megatron.core" >/dev/null 2>&1 && return 0
  if ls "$REPO"/.whl/megatron_core-*.whl >/dev/null 2>&1; then
    (cd "$REPO" && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site .whl/megatron_core-*.whl) \
      || { echo "[$tag] FAIL megatron_install: pip install of .whl failed"; return 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[$tag] FAIL megatron_install: megatron-core is not installed and no .whl/megatron_core-*.whl was carried"
    return 1
  fi
}

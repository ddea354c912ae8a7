#!/usr/bin/env bash
# The GPU checks of the DiT mixture (issue 13) in one run on a lent device machine, from this
# checkout plus .device-kit/ (ComfyUI 0.33 and the packages the machine's image lacks; build it
# here with tools/device_kit.py and name it in the run's carry):
#   1. bench/dynamic_vram_check.py: the gated loader keeps ComfyUI 0.33 on its dynamic-VRAM patcher
#   2. the same on float8_e4m3fn weights
#   3. bench/bench_mixture_dit.py on CUDA at FLUX.1's full depth: step-time ratios, per-layer costs
# Each log goes to $OUT (the device tool brings it back; written as it runs, so a run stopped at
# its time limit still returns what it did), else to ./gpu-checks/. Exit 1 when a check failed.
# DEVICE=cpu QUICK=1 bash bench/gpu_checks.sh is the same sequence as a smoke run on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
kit=.device-kit
if [ ! -d "$kit/ComfyUI/comfy" ] || [ ! -d "$kit/site" ]; then
  echo "gpu_checks: no $kit/ here: build it with tools/device_kit.py --comfyui <ComfyUI 0.33> and carry it" >&2
  exit 2
fi
export PYTHONPATH="$PWD/$kit/site${PYTHONPATH:+:$PYTHONPATH}" COMFYUI_PATH="$PWD/$kit/ComfyUI" PYTHONUNBUFFERED=1
out=${OUT:-gpu-checks}
mkdir -p "$out"
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
size=()
depth=(--double 19 --single 38 --steps 8 --repeats 3)
if [ -n "${QUICK:-}" ]; then
  size=(--tiny)
  depth=(--tiny --double 1 --single 1 --repeats 1 --layer-repeats 1)
fi
status=0
check() {
  local name=$1
  shift
  echo "=== $name: $*"
  "$python" "$@" 2>&1 | tee "$out/$name.log"
  local code=${PIPESTATUS[0]}
  echo "--- $name: exit $code"
  [ "$code" -eq 0 ] || status=1
}
nvidia-smi -L 2>/dev/null || true
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
check dynamic_vram_check bench/dynamic_vram_check.py --device "$device" "${size[@]}"
check dynamic_vram_check_fp8 bench/dynamic_vram_check.py --device "$device" --weight-dtype fp8 "${size[@]}"
check bench_mixture_dit bench/bench_mixture_dit.py --device "$device" "${depth[@]}" --per-layer
exit $status

#!/bin/bash
# The GPU machine's side of bench/gpu.py: unpack what `python bench/gpu.py pack` put in .gpu/ (carried),
# check the machine, run `bench/gpu.py device`; everything it writes lands in $OUT.
#   bash bench/gpu_run.sh LIMIT_S [device options...]
# A preceding call may carry .gpu-ort/ (onnxruntime-gpu, too large to share one transfer): it is
# unpacked to /tmp/ortcuda, where a later call on the same (warm) machine finds it.
export PYTHONUNBUFFERED=1
limit=$1; shift
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
echo "== $(date -u +%T) start"
untar() { python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$1" "$2"; }
if [ -f .gpu-ort/onnxruntime-gpu.tar.xz ] && [ ! -d /tmp/ortcuda/onnxruntime ]; then
  mkdir -p /tmp/ortcuda && untar .gpu-ort/onnxruntime-gpu.tar.xz /tmp/ortcuda && echo "onnxruntime-gpu unpacked"
fi
[ -d .gpu ] || { echo "no .gpu/ carried: only onnxruntime-gpu was unpacked"; exit 0; }
for f in .gpu/gl/*.deb; do dpkg -x "$f" /; done 2>/dev/null; ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .gpu/whl/apache_tvm_ffi*.whl .gpu/whl/gguf*.whl 2>&1 | tail -2
if ls .gpu/whl/onnxruntime_webgpu*.whl >/dev/null 2>&1 && [ ! -d /tmp/ortw/onnxruntime ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ortw \
    .gpu/whl/onnxruntime_webgpu*.whl 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/machine.txt"
python3 -c "import sys, numpy, tvm_ffi; print(sys.version.split()[0], 'numpy', numpy.__version__, 'tvm_ffi', tvm_ffi.__version__)" | tee -a "$OUT/machine.txt"
ldconfig -p | grep -E "libvulkan|libcudart|libcuda\.so|libcublas" | tee -a "$OUT/machine.txt"
if ! python3 edgeforge/vulkan_probe.py | grep -q '"name"'; then  # the device README's fallback for the ICD
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
python3 edgeforge/vulkan_probe.py | tee -a "$OUT/machine.txt"
rm -rf /tmp/b && mkdir -p /tmp/b && untar .gpu/b.tar.xz /tmp/b
if [ -f .gpu/llama-bench.xz ]; then
  python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" .gpu/llama-bench.xz /tmp/llama-bench
  chmod +x /tmp/llama-bench
fi
# libcudart/libcublas 13 for llama-bench and TVM's CUDA runtime: the image's CUDA wheels (PyTorch's)
CUDALIB=$(python3 -c "import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], 'lib'))" 2>/dev/null)
[ -n "$CUDALIB" ] && export LD_LIBRARY_PATH=$CUDALIB:$LD_LIBRARY_PATH
echo "== $(date -u +%T) setup done (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
timeout "$limit" python3 bench/gpu.py device --bundles /tmp/b --out "$OUT" --work /tmp/gw "$@" 2>&1 \
  | tee "$OUT/device.log" | grep -E "^\[|Error|error" | cut -c1-600
echo "== $(date -u +%T) end"

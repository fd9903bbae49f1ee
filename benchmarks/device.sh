#!/usr/bin/env bash
# The accelerator's numbers of the README (issue 17): `bash benchmarks/device.sh [OUTDIR]` on a
# machine with a GPU and JAX for it (no install needed: the package is read from this checkout).
#
# 1. the versions and the device;
# 2. benchmarks/presets.py at GPU-sized reductions (256:512 and 512:1024): svhn, cifar10, mnist,
#    extrapolated to one seed of each preset's protocol;
# 3. benchmarks/conv_kernels.py: the CNN and WRN-10-2 kernels, their ratio to the measured
#    float32 matmul limit, and the stream case (gradient evaluations per point).
# Each step has its own time limit and writes its log and JSON to OUTDIR as it goes, so a step
# that runs out of time loses only itself.  DEVICE_QUICK=1 runs every step at smoke-test sizes.
set -u
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
quick=${DEVICE_QUICK:-0}
t_kern=${T_KERNELS:-120} t_pre=${T_PRESETS:-240}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc"
}

$py - <<'EOF' 2>&1 | tee "$out/versions.txt" || exit 1
import jax, flax, optax, numpy, ntk_tutorial
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
EOF
grep -q "devices" "$out/versions.txt" || exit 1
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/versions.txt"

if [ "$quick" = 1 ]; then
    step conv_kernels "$t_kern" $py benchmarks/conv_kernels.py --quick --output "$out/conv_kernels.json"
    step presets "$t_pre" $py benchmarks/presets.py --quick --output "$out/presets.json"
    exit 0
fi
step presets "$t_pre" $py benchmarks/presets.py --presets svhn cifar10 mnist --sizes 256:512 512:1024 \
    --output "$out/presets.json"
step conv_kernels "$t_kern" $py benchmarks/conv_kernels.py --output "$out/conv_kernels.json"

#!/usr/bin/env bash
# Every GPU check in one command, for a machine with a CUDA GPU: the CUDA tests (tests/test_cuda.py)
# and the benches at their GPU settings (512 px, ResNet-50 / Unet-ResNet34, bf16; walk at 128x128).
#
#   make gpu-check                  # logs in runs/gpu-check/, or in $OUT when it is set
#   make gpu-check STEPS=scale      # only the named steps (bash bench/gpu_check.sh scale)
#
# It runs with the `python3` that holds torch (PYTHON=... to choose another). Packages that machine
# lacks are installed from .whl/ when that folder has wheels (`make device-wheels` fills it from
# ../shared/wheels-py312 for a Python 3.12 machine). Each step has its own time limit; a failing
# step is reported and the others still run; the exit code says whether any failed. Without
# arguments it runs tests, walk, crf, cam, seg and irn, whose limits add up to 9.5 minutes: the
# check fits one 10-minute command on a borrowed machine. The step `scale` (bench/pipeline_scale.py:
# every stage at VOC and SIIM settings, projected to the whole datasets) has a limit of its own
# 9 minutes and runs only when named, in a command of its own.
set -uo pipefail

STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(tests walk crf cam seg irn)
for name in "${STEPS[@]}"; do
    case $name in tests|walk|crf|cam|seg|irn|scale) ;; *) echo "unknown step: $name"; exit 2 ;; esac
done
wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/wss-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/wss-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

failed=()
step() {  # step NAME SECONDS COMMAND...: the output goes to the screen and to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; failed+=("$name"); }
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 1
wanted tests && step tests 120 "$PY" -m pytest tests/test_cuda.py -m cuda -rs -p no:cacheprovider
wanted walk && step walk 90 "$PY" bench/random_walk.py --device cuda --sizes 64,128
wanted crf && step crf 90 "$PY" bench/crf.py --device cuda --repeats 3
wanted cam && step cam 120 "$PY" bench/stage_cam.py --device cuda
wanted seg && step seg 90 "$PY" bench/stage_seg.py --device cuda
wanted irn && step irn 60 "$PY" bench/stage_irn.py --device cuda --size 512 --images 16 --backbone resnet50 \
    --crf-workers none,8 --loaders 4
wanted scale && step scale 540 "$PY" bench/pipeline_scale.py --device cuda --out "$OUT/pipeline-scale"

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu-check: failed: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "gpu-check: all steps passed (logs in $OUT)"

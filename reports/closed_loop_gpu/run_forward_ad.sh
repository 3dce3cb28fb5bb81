#!/usr/bin/env bash
# 50-seed closed loops of warm exact Newton with forward-mode (exact) Jacobians on a CUDA machine.
# Usage on the device: bash reports/closed_loop_gpu/run_forward_ad.sh OUT_DIR [SECONDS]
# Run A: tail_fill=chain, step tolerance 1e-3. Run B (if time is left) depends on A: a tighter step
# tolerance if A was more than 1e-3 off somewhere, else the repeat tail at A's settings (the fill comparison).
set -u
out=$1
limit=${2:-560}
start=$SECONDS
common="task=pusht solver=newton solver.options.jacobian=exact +solver.options.derivatives=forward_ad
+solver.options.recursion=scan warm_start=true
solver.noise=coupled env_batch=50 check_exactness=true device=cuda threads=8"
run() {  # name, seconds, extra overrides...
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($seconds s): $*"
    timeout "$seconds" python3 eval/rollout.py $common "$@" out_dir="$out/$name" 2>&1 | grep -v "it/s\]$" | tail -8
    cp "$out/$name/results.json" "$out/$name.json" 2>/dev/null && rm -rf "${out:?}/$name"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run exact_fwdad_warm_chain_step1e-3 $((limit - 40)) tail_fill=chain +solver.options.step_tolerance=1e-3
left=$((limit - (SECONDS - start)))
dev=$(python3 -c "import json;print(json.load(open('$out/exact_fwdad_warm_chain_step1e-3.json'))['max_abs_dev'])" 2>/dev/null || echo 1)
if python3 -c "import sys; sys.exit(0 if float('$dev') > 1e-3 else 1)"; then
    run exact_fwdad_warm_chain_step3e-4 "$left" tail_fill=chain +solver.options.step_tolerance=3e-4
else
    run exact_fwdad_warm_repeat_step1e-3 "$left" tail_fill=repeat +solver.options.step_tolerance=1e-3
fi

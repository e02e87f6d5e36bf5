#!/usr/bin/env bash
# The one H200 job: build for sm_90a with every core, run the GPU tests, run the benchmarks,
# and leave logs and results in OUT_DIR.
#
#   bash scripts/h200.sh OUT_DIR [STEP ...]
#   STEP: build test bench wheel sanitize (default: build test bench)
#   BENCH_FAMILIES="codebook hashing" and BENCH_PROBLEMS="mesh300k vq-lc-bf16" narrow the
#   bench, BENCH_TIMEOUT=120 caps each problem's process (seconds), BENCH_ARGS adds options;
#   PYTEST_ARGS adds pytest options. test and sanitize run the test groups (graph window codebook
#   hashing; TEST_GROUPS narrows) in parallel processes, each capped by TEST_TIMEOUT seconds,
#   with its output in OUT_DIR/test-GROUP.txt or sanitize-GROUP.txt. At the cap pytest gets
#   SIGINT, so it still prints its summary and slowest tests. Where pytest-xdist is installed
#   each group runs TEST_WORKERS (3) workers.
#
# OUT_DIR receives log.txt (everything), and bench/results.json + one PNG per family.
set -uo pipefail
OUT=${1:?usage: scripts/h200.sh OUT_DIR [STEP ...]}
shift
STEPS=${*:-build test bench}
mkdir -p "$OUT/bench"
LOG="$OUT/log.txt"
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
status=0
step() { echo "=== $* ($(date +%T))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=$rc; return "$rc"; }

group_files() {  # the test files of one family group (on a GPU the Triton files run on cuda)
  case $1 in
    graph) echo tests/test_graph.py tests/test_graph_attn.py tests/test_graph_attn_triton.py \
                tests/test_graph_order.py tests/test_nn_graph.py ;;
    window) echo tests/test_window_attn.py tests/test_window_attn_triton.py \
                 tests/test_graph_union.py tests/test_graph_union_triton.py ;;
    codebook) echo tests/test_codebook.py tests/test_nn_vq.py ;;
    hashing) echo tests/test_hashing.py tests/test_gather_sum.py tests/test_hashing_triton.py \
                  tests/test_nn_memory.py ;;
  esac
}
run_groups() {  # NAME COMMAND...: every group in parallel, the summaries into the log
  local name=$1; shift
  local workers=""  # pytest-xdist workers per group: Triton compiles on more cores
  python3 -c "import xdist" 2>/dev/null && workers="-n ${TEST_WORKERS:-3}"
  for g in ${TEST_GROUPS:-graph window codebook hashing}; do
    ( timeout -s INT -k 20 "${TEST_TIMEOUT:-0}" "$@" $(group_files "$g") $workers ${PYTEST_ARGS:-} \
        > "$OUT/$name-$g.txt" 2>&1; echo "exit status $?" >> "$OUT/$name-$g.txt" ) &
  done
  wait
  for g in ${TEST_GROUPS:-graph window codebook hashing}; do
    echo "--- $name $g" | tee -a "$LOG"; tail -n 16 "$OUT/$name-$g.txt" | tee -a "$LOG"
    grep -q "exit status 0" "$OUT/$name-$g.txt" || status=1
  done
}

for s in $STEPS; do
  case $s in
    build)
      step build
      run python3 -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
      run python3 -c "import gtkernels, torch; print(gtkernels.build_info()); print(torch.cuda.get_device_name())"
      run cuobjdump --list-elf gtkernels/_C*.so ;;
    test)
      step "gpu tests, groups in parallel"
      GTK_INSTAFAIL=1 run_groups test python3 -m pytest -q --durations=8 ;;
    bench)
      # One process per problem: a failing peer that breaks the CUDA context (a device-side
      # assert) costs only that problem's later rows. results.json accumulates across them.
      cases=$(python3 -c "
import bench.core.registry as r
fams, probs = '${BENCH_FAMILIES:-}'.split(), '${BENCH_PROBLEMS:-}'.split()
for p in r.load_families().problems.values():
    if (not fams or p.family in fams) and (not probs or p.name in probs):
        print(p.family + ':' + p.name)")
      for case in $cases; do
        step "bench $case"
        run timeout "${BENCH_TIMEOUT:-0}" python3 -m bench --merge --family "${case%%:*}" \
          --problem "${case#*:}" --out "$OUT/bench" ${BENCH_ARGS:-}
      done
      python3 -m bench.report_only "$OUT/bench" 2>&1 | tee -a "$LOG" ;;
    wheel)
      step wheel
      rm -rf /tmp/gtk-wheel /tmp/gtk-venv
      run python3 -m pip wheel --no-build-isolation --no-deps . -w /tmp/gtk-wheel
      # A fresh venv that sees the machine's torch (itself in a venv) through a .pth line.
      run python3 -m venv /tmp/gtk-venv
      python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" \
        > "$(/tmp/gtk-venv/bin/python -c 'import site; print(site.getsitepackages()[0])')/machine_torch.pth"
      run /tmp/gtk-venv/bin/pip install --no-deps /tmp/gtk-wheel/*.whl
      (cd /tmp && run /tmp/gtk-venv/bin/python -c "import gtkernels as gk, torch; print(gk.__file__, gk.build_info()['version']); print(gk.sign_hash(torch.randn(2, 8, device='cuda'), 4))") ;;
    sanitize)
      step compute-sanitizer memcheck
      # GTK_AUTOTUNE=0: each tuned kernel runs its first config (autotuning under the
      # sanitizer would take most of the time).
      GTK_AUTOTUNE=0 GTK_INSTAFAIL=1 run_groups sanitize compute-sanitizer --tool memcheck \
        --target-processes all \
        --error-exitcode 9 python3 -m pytest -q --durations=8 ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
step "done, status $status"
exit $status

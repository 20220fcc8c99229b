#!/usr/bin/env bash
# shellcheck disable=SC2329  # the stage_* functions run through `bash -c` under timeout
# The one command a lent GPU machine runs (README "GPU session"): build edgespec for sm_90a, run
# the GPU tests (kernel oracle tests first) and the benchmarks, and pack everything into $OUT:
#   gpu_results.tar.gz  gpu_session/{summary.txt,env.txt,build_info.json,device.json,
#                       logs/*.log,junit/*.xml,results/*.json (this run's bench/results files)}
#   summary.txt         the table printed last: stage, status, exit code, seconds, key numbers
#   session.log         everything this script printed
# Each stage runs under its own timeout inside one session budget (default 480 s, --quick 240 s),
# logs to its own file and records its exit code; a failing stage stops nothing, except a failed
# build, which skips every stage that needs the extension (logs are still packed). The tarball and
# the summary are rewritten after every stage, so a run killed at its limit still returns them.
# Nothing here changes the GPU's settings: nvidia-smi is only queried.
#
#   bash tools/gpu_session.sh [--quick] [--only LIST] [--commit SHA] [--skip-build] [--budget S]
#
#   --quick        smaller benchmark sets, shorter test budget, no C++ benchmarks (~4 minutes)
#   --only LIST    comma-separated groups (build, tests, bench) or stage names (tests_kernels,
#                  bench_w4a16, cpp_bench, ...); env always runs
#   --commit SHA   recorded in every result (the machine gets the tree without .git); default:
#                  the file .gpu_commit in the repo root, else git, else "unknown"
#   --skip-build   build nothing: use the installed edgespec and any C++ binaries already in
#                  build/gpu-bench (a warm rerun, or a dry run on a CPU)
#   --budget S     total seconds for all stages (default 480, --quick 240)
#
# Unpack on the dev machine: python3 tools/unpack_gpu_results.py gpu_results.tar.gz
set -uo pipefail

usage() { sed -n '3,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

QUICK=0 ONLY="" COMMIT="" BUDGET="" SKIP_BUILD=0
ARGS="$*"
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --only) ONLY=${2:-}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --commit) COMMIT=${2:-}; shift ;;
    --commit=*) COMMIT=${1#*=} ;;
    --skip-build) SKIP_BUILD=1 ;;
    --budget) BUDGET=${2:-}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_session.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# Stages in the order they run; the group is what --only build,tests,bench selects.
STAGES=(env build cpp_build tests_kernels tests_attention tests_sm90 tests_w4a16 tests_sparse tests_blockffn
        tests_graphs tests_other bench_attention bench_w4a16 bench_sparse bench_blockffn cpp_bench bench_e2e bench_spec
        bench_spec_graphs bench_spec_sampling bench_structured bench_prefix_cache bench_sampling bench_gguf_load)
declare -A GROUP=([env]=env [build]=build)
for s in "${STAGES[@]}"; do
  case $s in tests_*) GROUP[$s]=tests ;; bench_*|cpp_*) GROUP[$s]=bench ;; esac
done
for tok in ${ONLY//,/ }; do
  if [[ $tok != build && $tok != tests && $tok != bench && -z ${GROUP[$tok]:-} ]]; then
    echo "gpu_session.sh: --only: unknown stage or group '$tok' (groups: build tests bench; stages: ${STAGES[*]})" >&2
    exit 2
  fi
done
[[ -z $BUDGET ]] && BUDGET=$(( QUICK ? 240 : 480 ))
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_session.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2; }

# Per-stage timeouts in seconds (default, --quick), cut further by what is left of the budget.
declare -A CAP=([env]="60 60" [build]="300 300" [extension]="60 60" [cpp_build]="300 0" [tests_kernels]="100 50"
                [tests_attention]="100 45" [tests_sm90]="40 25" [tests_w4a16]="60 30" [tests_sparse]="50 25"
                [tests_blockffn]="50 25" [tests_graphs]="50 25" [tests_other]="40 20" [bench_attention]="90 40"
                [bench_w4a16]="90 30" [bench_sparse]="75 30" [bench_blockffn]="60 25" [bench_sampling]="30 15"
                [cpp_bench]="45 0" [bench_e2e]="60 25" [bench_spec]="75 35"
                [bench_spec_graphs]="60 30" [bench_spec_sampling]="45 0" [bench_structured]="45 0"
                [bench_prefix_cache]="40 0" [bench_gguf_load]="90 30")
TESTS_BUDGET=$(( QUICK ? 100 : 200 ))  # all tests_* stages together
TEST_TIMEOUT=$(( QUICK ? 60 : 90 ))    # one test (pytest-timeout)
RESERVE_S=20                           # kept back for the summary and the tarball
MIN_STAGE_S=10                         # a stage with less time than this is not started

ORIG_PWD=$PWD
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
OUT=${OUT:-$ORIG_PWD/gpu_out}
if ! mkdir -p "$OUT" || ! OUT=$(cd "$OUT" && pwd); then echo "gpu_session.sh: cannot create OUT=$OUT" >&2; exit 2; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX") || exit 2
S=$WORK/gpu_session            # what the tarball holds
RUNDIR=$WORK/run               # tests run here, so `import edgespec` finds the installed package
mkdir -p "$S/logs" "$S/junit" "$S/results" "$S/notes" "$RUNDIR"
HELPER=$WORK/helper.py

exec > >(tee "$OUT/session.log") 2>&1
TEE_PID=$!

T0=$(date +%s)
DEADLINE=$(( T0 + BUDGET ))
say() { printf '== [%3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

if [[ -z $COMMIT && -s $REPO/.gpu_commit ]]; then COMMIT=$(tr -d ' \n' <"$REPO/.gpu_commit"); fi
if [[ -z $COMMIT ]]; then COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown); fi
[[ $COMMIT != unknown ]] && export EDGESPEC_COMMIT=$COMMIT   # read by bench/python/benchlib.py

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_NO_INPUT=1
NPROC=$(nproc)
export CMAKE_BUILD_PARALLEL_LEVEL=$NPROC
unset EDGESPEC_BACKEND EDGESPEC_SPARSE   # measure the defaults
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=$PATH:/usr/local/cuda/bin
fi
# A demo model carried in the (ignored) repo folder .cache/edgespec is used from there.
if [[ -z ${EDGESPEC_CACHE:-} && -d $REPO/.cache/edgespec ]]; then export EDGESPEC_CACHE=$REPO/.cache/edgespec; fi
PYTEST_TIMEOUT_ARG=""
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT_ARG="--timeout=$TEST_TIMEOUT"
SLUG=cpu HAS_CUDA=0 GPU_NAME="no CUDA device" DRIVER=""
export REPO S RUNDIR HELPER NPROC COMMIT PYTEST_TIMEOUT_ARG

cat >"$HELPER" <<'PY'
"""tools/gpu_session.sh's helpers: one subcommand per call, output parsed by the script."""
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def device(out: str) -> None:
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": torch.cuda.is_available(),
            "name": "no CUDA device", "slug": "cpu"}
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(p.L2_cache_size / 2**20, 1),
                    slug=re.sub(r"[^a-z0-9]+", "-", p.name.lower()).strip("-"))
    Path(out).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    extra = f", cc {info['capability']}, {info['sms']} SMs, {info['memory_gib']} GiB" if info["cuda"] else ""
    print(f"NOTE\t{info['name']}{extra}; torch {info['torch']} (CUDA {info['torch_cuda']})")
    print(f"VARS\t{int(info['cuda'])}\t{info['slug']}\t{info['name']}")


def buildinfo(out: str, arch: str) -> None:
    """Exit 3 unless the imported edgespec has its CUDA extension (built for `arch`)."""
    import edgespec

    info = edgespec.build_info()
    info["imported_from"] = edgespec.__file__
    Path(out).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    archs = ",".join(info["architectures"])
    print(f"NOTE\tcuda {info['cuda']}, archs [{archs}], CUDA {info['cuda_version']}, from {Path(edgespec.__file__).parent}")
    if not info["cuda"]:
        print(f"EXTENSION MISSING: edgespec at {edgespec.__file__} has no CUDA extension: {info.get('reason')}")
        sys.exit(3)
    if arch not in archs:
        print(f"EXTENSION WRONG: built for [{archs}], not {arch}: kernels would fail with no kernel image")
        sys.exit(3)


def junit(path: str, failures_out: str) -> None:
    """Print passed, failed, errors, skipped, uncollected modules, total and the first skip reason
    (tab-separated); write the failing ids with their first message line to `failures_out`."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0, uncollected=0)
    failed, reason = [], ""
    for case in ET.parse(path).iter("testcase"):
        if not case.get("name"):  # the test running when pytest was interrupted
            continue
        tid = f"{case.get('classname')}::{case.get('name')}"
        kids = {child.tag: child for child in case}
        if "error" in kids and kids["error"].get("message") == "collection failure":
            counts["uncollected"] += 1
            last = [ln for ln in (kids["error"].text or "").splitlines() if ln.startswith("E ")][-1:]
            failed.append(f"{case.get('name')}: not collected: {last[0][1:].strip()[:160] if last else ''}")
        elif "failure" in kids or "error" in kids:
            kind = "failure" if "failure" in kids else "error"
            counts["failed" if kind == "failure" else "errors"] += 1
            msg = (kids[kind].get("message") or "").splitlines()
            failed.append(f"{tid}: {msg[0][:160] if msg else kind}")
        elif "skipped" in kids:
            counts["skipped"] += 1
            reason = reason or (kids["skipped"].get("message") or "")[:120]
        else:
            counts["passed"] += 1
    Path(failures_out).write_text("".join(f"{line}\n" for line in failed))
    total = sum(counts.values())
    print("\t".join(str(v) for v in (*counts.values(), total, reason.replace("\t", " ") or "-")))


def results(*paths: str) -> None:
    """One line per bench JSON: rows, speedup geomean/range, errors, targets missed, accept_len."""
    parts = []
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            parts.append(f"{Path(p).name}: unreadable ({exc})")
            continue
        rows = doc.get("rows", [])
        sp = [r["speedup"] for r in rows if isinstance(r.get("speedup"), (int, float)) and r["speedup"] > 0]
        errs = sum(1 for r in rows if "error" in r)
        text = f"{Path(p).stem}: {len(rows)} rows"
        if doc.get("interrupted"):
            text += f" (interrupted {doc['interrupted']})"
        if sp:
            geo = math.exp(sum(map(math.log, sp)) / len(sp))
            text += f", speedup geomean {geo:.2f}x ({min(sp):.2f}-{max(sp):.2f})"
        if errs:
            text += f", {errs} errors"
        targets = [t for t in doc.get("targets", []) if isinstance(t, str)]
        if targets:
            text += f", targets {sum('MISSED' in t for t in targets)}/{len(targets)} missed"
        accept = [r["accept_len"] for r in rows if "accept_len" in r]
        if accept:
            text += f", accept_len {accept[-1]}"
        parts.append(text)
    print("; ".join(parts) or "no results written")


def demo() -> None:
    """Print why the demo-model benchmarks cannot run here (nothing when they can)."""
    import importlib.util

    from edgespec.loading.demo import DEMO_FILE, cache_dir

    if importlib.util.find_spec("gguf") is None:
        print("python package gguf missing (carry its wheel in .whl/, see the device README)")
    elif not (cache_dir() / "demo" / DEMO_FILE).exists():
        print(f"demo model not available offline: {cache_dir() / 'demo' / DEMO_FILE} missing "
              "(~94 MiB, more than the device tool carries)")


if __name__ == "__main__":
    {"device": device, "buildinfo": buildinfo, "junit": junit, "results": results, "demo": demo}[sys.argv[1]](*sys.argv[2:])
PY

# --- bookkeeping ------------------------------------------------------------------------------
ORDER=()
declare -A ST=() RCS=() SECS=() NOTES=()
record() {  # name status rc secs note
  [[ -z ${ST[$1]:-} ]] && ORDER+=("$1")
  ST[$1]=$2 RCS[$1]=$3 SECS[$1]=$4 NOTES[$1]=$5
  package
}
# A stage's key numbers: its last "NOTE<tab>..." line, else (when it did not succeed) its last line.
note_of() {
  local log=$S/logs/$1.log note
  note=$(sed -n 's/^NOTE\t//p' "$log" 2>/dev/null | tail -n 1)
  [[ -z $note && $2 != ok ]] && note=$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1 | cut -c1-150)
  printf '%s' "$note"
}

summary_table() {
  local now; now=$(date +%s)
  printf 'gpu_session: commit %s; %s%s; %s cores; %ss of a %ss budget; args: %s\n' \
    "$COMMIT" "$GPU_NAME" "${DRIVER:+ (driver $DRIVER)}" "$NPROC" "$(( now - T0 ))" "$BUDGET" "${ARGS:-none}"
  printf '%-16s %-8s %5s %5s  %s\n' stage status exit secs "key numbers"
  local n
  for n in "${ORDER[@]}"; do
    printf '%-16s %-8s %5s %5s  %s\n' "$n" "${ST[$n]}" "${RCS[$n]}" "${SECS[$n]}" "${NOTES[$n]}"
  done
}

package() {
  summary_table >"$S/summary.txt"
  cp "$S/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/gpu_results.tar.gz.part" -C "$WORK" gpu_session && mv -f "$OUT/gpu_results.tar.gz.part" "$OUT/gpu_results.tar.gz"
}

selected() {
  local name=$1 tok
  [[ $name == env ]] && return 0
  [[ ( $name == build || $name == cpp_build ) && $SKIP_BUILD == 1 ]] && return 1
  for tok in ${ONLY//,/ }; do
    [[ $tok == "$name" ]] && return 0
    [[ $tok == "${GROUP[$name]}" ]] && break
  done
  [[ -n $ONLY && $tok != "${GROUP[$name]}" ]] && return 1
  # --quick leaves the C++ benchmarks out unless they are named.
  [[ $QUICK == 1 && ( $name == cpp_build || $name == cpp_bench ) ]] && return 1
  return 0
}

# Seconds a stage may take: its cap, cut by the group's and the session's deadlines.
budget_for() {
  local name=$1 group_deadline=${2:-$DEADLINE} now cap t
  now=$(date +%s)
  read -r -a cap <<<"${CAP[$name]}"
  t=${cap[$QUICK]}
  (( t > DEADLINE - RESERVE_S - now )) && t=$(( DEADLINE - RESERVE_S - now ))
  (( t > group_deadline - now )) && t=$(( group_deadline - now ))
  echo $(( t < 0 ? 0 : t ))
}

status_of() {  # rc -> status
  case $1 in
    0) echo ok ;; 77) echo skip ;; 124|137) echo TIMEOUT ;; *) echo FAIL ;;
  esac
}

# run_stage NAME GROUP_DEADLINE CMD...: run CMD under the stage's timeout, log to logs/NAME.log.
# SIGINT first, so pytest writes its junit XML and a Python traceback shows where time went.
run_stage() {
  local name=$1 gdl=$2 t t0 rc secs status
  shift 2
  t=$(budget_for "$name" "$gdl")
  if (( t < MIN_STAGE_S )); then
    record "$name" skip - 0 "not run: no time left (${t}s)"
    say "$name: not run, no time left"
    return 0
  fi
  say "$name (timeout ${t}s): $*"
  t0=$(date +%s)
  timeout -s INT -k 15 "$t" "$@" >"$S/logs/$name.log" 2>&1 </dev/null
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  status=$(status_of "$rc")
  case $name in
    tests_*|bench_*|cpp_*) [[ $HAS_CUDA == 0 && $status != ok ]] && status=nogpu ;;
  esac
  record "$name" "$status" "$rc" "$secs" "$(note_of "$name" "$status")"
  say "$name: $status (exit $rc, ${secs}s)"
  if [[ $status == FAIL || $status == TIMEOUT ]]; then tail -n 15 "$S/logs/$name.log" | sed 's/^/   | /'; fi
}

# --- stages (run as `bash -c NAME` under timeout, hence exported) -----------------------------
stage_env() {
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  echo "nproc: $NPROC"
  echo "commit: $COMMIT"
  free -g | head -n 2
  df -h "$REPO" | tail -n 1
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode,mig.mode.current --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  nvcc --version 2>&1 | tail -n 2 || true
  cmake --version 2>&1 | head -n 1 || true
  echo "ninja $(ninja --version 2>&1)"
  python3 --version
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|pytest|pytest-timeout|pytest-xdist|pybind11|scikit-build-core|gguf|numpy) ' || true
  python3 "$HELPER" device "$S/device.json"
}

stage_build() {
  if ! command -v nvcc >/dev/null 2>&1; then
    echo "BUILD FAILED: nvcc not found (PATH=$PATH)"
    return 3
  fi
  echo "CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL"
  # EDGESPEC_CUDA=ON: a missing CUDA compiler is an error, not a silent pure-Python install.
  if ! python3 -m pip install -v --no-build-isolation --no-deps --no-index \
      -C cmake.define.EDGESPEC_CUDA=ON -C cmake.define.EDGESPEC_CUDA_ARCHS=90a-real \
      -C cmake.define.EDGESPEC_BUILD_BENCH=OFF "$REPO"; then
    echo "== the first compiler/CMake errors above:"
    grep -E '(error|FAILED:|CMake Error)' "$S/logs/build.log" | grep -v '^== ' | head -n 12
    echo "BUILD FAILED: pip install did not succeed"
    return 3
  fi
  (cd "$RUNDIR" && python3 "$HELPER" buildinfo "$S/build_info.json" 90a) || { echo "BUILD FAILED: see above"; return 3; }
  # The bench scripts put python/ first on sys.path: give the source tree the same extension.
  local so
  so=$(cd "$RUNDIR" && python3 -c "import edgespec._C as m; print(m.__file__)") || return 3
  if [[ ! $(dirname "$so") -ef $REPO/python/edgespec ]]; then cp -f "$so" "$REPO/python/edgespec/"; fi
  (cd "$REPO/bench/python" && python3 -c "import sys; sys.path.insert(0, '$REPO/python'); import edgespec
i = edgespec.build_info(); print('source tree:', edgespec.__file__, 'cuda', i['cuda']); sys.exit(0 if i['cuda'] else 3)") \
    || { echo "BUILD FAILED: the source tree's edgespec (used by bench/python) has no extension"; return 3; }
}

stage_check_extension() {
  cd "$RUNDIR" && python3 "$HELPER" buildinfo "$S/build_info.json" 90a
}

stage_pytest() {  # junit-name pytest-args...
  local name=$1
  shift
  cd "$RUNDIR" || return 1
  local timeout_arg=()
  [[ -n $PYTEST_TIMEOUT_ARG ]] && timeout_arg=("$PYTEST_TIMEOUT_ARG")
  python3 -c "import edgespec; print('edgespec imported from', edgespec.__file__)"
  python3 -m pytest -q -m gpu -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    "${timeout_arg[@]}" -rfE --tb=short --durations=10 --junitxml "$S/junit/$name.xml" "$@"
}

CPP_DIR=$REPO/build/gpu-bench
export CPP_DIR
stage_cpp_build() {
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  cmake -S "$REPO" -B "$CPP_DIR" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DEDGESPEC_CUDA=ON \
    -DEDGESPEC_CUDA_ARCHS=90a-real -DEDGESPEC_BUILD_BENCH=ON -DPython_EXECUTABLE="$(command -v python3)" || return 3
  nice -n 10 cmake --build "$CPP_DIR" -j "$NPROC" --target bench_basic_ops bench_attention bench_w4a16
}

stage_cpp_bench() {
  local rc=0
  ctest --test-dir "$CPP_DIR" --output-on-failure || rc=$?
  "$CPP_DIR/bench/cpp/bench_basic_ops" --json "$REPO/bench/results/basic_ops-$SLUG.json" --commit "$COMMIT"
  local bench_rc=$?
  return $(( rc ? rc : bench_rc ))
}
export -f stage_env stage_build stage_check_extension stage_pytest stage_cpp_build stage_cpp_bench

# Tests: nothing passed counts as failure (all skipped means no GPU or no extension).
post_tests() {  # name allow-empty
  local name=$1 allow_empty=$2 f=$S/junit/$1.xml passed failed errors skipped uncollected reason rc status note
  rc=${RCS[$name]}
  status=${ST[$name]}
  [[ $rc == - ]] && return 0
  if [[ -f $f ]]; then
    IFS=$'\t' read -r passed failed errors skipped uncollected _ reason \
      < <(python3 "$HELPER" junit "$f" "$S/notes/$name.failures")
    note="$passed passed, $failed failed, $errors errors, $skipped skipped"
    (( uncollected )) && note+=", $uncollected modules not collected"
  else
    passed=0 failed=0 errors=0 uncollected=0 reason="" note="no junit XML"
  fi
  if [[ $allow_empty == 1 && $passed == 0 && $failed == 0 && $errors == 0 && $rc != 124 && $rc != 137 ]]; then
    # Only modules that need packages this machine lacks failed to load: not a gpu test result.
    rc=0 status=ok note="no gpu tests outside the kernel test files"
    (( uncollected )) && note+=" ($uncollected modules not collected, see logs/$name.log)"
  elif [[ $rc == 5 || ( $rc == 0 && $passed == 0 ) ]]; then
    rc=5 status=FAIL note="$note: nothing passed${reason:+ ($reason)}"
    [[ $HAS_CUDA == 0 ]] && status=nogpu
  fi
  record "$name" "$status" "$rc" "${SECS[$name]}" "$note"
}

run_tests() {  # name allow-empty pytest-args...
  local name=$1 allow_empty=$2
  shift 2
  selected "$name" || return 0
  run_stage "$name" "$TESTS_DEADLINE" bash -c 'stage_pytest "$@"' _ "$name" "$@"
  post_tests "$name" "$allow_empty"
}

# Benchmarks: copy the JSON files this stage wrote into results/ and summarise them.
run_bench() {  # name script args...
  local name=$1 f files=()
  shift
  selected "$name" || return 0
  touch "$WORK/mark.$name"
  run_stage "$name" "$DEADLINE" python3 "$@"
  while IFS= read -r f; do files+=("$f"); cp -f "$f" "$S/results/"; done \
    < <(find "$REPO/bench/results" -name '*.json' -newer "$WORK/mark.$name" | sort)
  if [[ ${RCS[$name]} != - ]]; then
    local note
    note=$(python3 "$HELPER" results "${files[@]}")
    [[ ${#files[@]} == 0 ]] && note="no results written: $(grep -v '^\s*$' "$S/logs/$name.log" | tail -n 1 | cut -c1-150)"
    record "$name" "${ST[$name]}" "${RCS[$name]}" "${SECS[$name]}" "$note"
  fi
}

skip_rest() {  # reason: record every selected stage not run yet
  local n
  for n in "${STAGES[@]}"; do
    if selected "$n" && [[ -z ${ST[$n]:-} ]]; then ST[$n]=skip RCS[$n]=- SECS[$n]=0 NOTES[$n]=$1; ORDER+=("$n"); fi
  done
  package
}

BG_PID="" BG_T0=0 BG_T=0
start_cpp_build() {
  selected cpp_build || return 0
  BG_T=$(budget_for cpp_build)
  if (( BG_T < MIN_STAGE_S )); then record cpp_build skip - 0 "not run: no time left"; return 0; fi
  say "cpp_build (background, niced, timeout ${BG_T}s): cmake --build $CPP_DIR"
  BG_T0=$(date +%s)
  ( timeout -s INT -k 15 "$BG_T" bash -c stage_cpp_build >"$S/logs/cpp_build.log" 2>&1 </dev/null
    echo $? >"$WORK/rc.cpp_build" ) &
  BG_PID=$!
}

finish_cpp_build() {
  [[ -z $BG_PID ]] && return 0
  say "waiting for cpp_build"
  wait "$BG_PID"
  BG_PID=""
  local rc secs status
  rc=$(cat "$WORK/rc.cpp_build" 2>/dev/null || echo 1)
  secs=$(( $(date +%s) - BG_T0 ))
  status=$(status_of "$rc")
  local built=0 b
  for b in "$CPP_DIR"/bench/cpp/bench_*; do [[ -x $b && ! -d $b ]] && built=$(( built + 1 )); done
  record cpp_build "$status" "$rc" "$secs" "$built binaries in build/gpu-bench/bench/cpp"
  say "cpp_build: $status (exit $rc, ${secs}s)"
  [[ $status != ok ]] && tail -n 15 "$S/logs/cpp_build.log" | sed 's/^/   | /'
}

finish() {
  [[ -n $BG_PID ]] && { kill -INT "$BG_PID" 2>/dev/null; finish_cpp_build; }
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv >"$S/logs/env_end.log" 2>&1
  fi
  cp "$S/logs/env.log" "$S/env.txt" 2>/dev/null
  package
  local n f
  for n in "${ORDER[@]}"; do
    f=$S/notes/$n.failures
    if [[ -s $f ]]; then
      echo "-- $n: $(wc -l <"$f") failed (first 8; all in logs/$n.log, junit/$n.xml)"
      head -n 8 "$f" | cut -c1-200
    fi
  done
  echo
  summary_table
  echo "files: $OUT/gpu_results.tar.gz ($(tar -tzf "$OUT/gpu_results.tar.gz" | grep -vc '/$') files), $OUT/summary.txt, $OUT/session.log"
  echo "unpack on the dev machine: python3 tools/unpack_gpu_results.py <files_at>/gpu_results.tar.gz"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap 'say "interrupted"; finish; exit 130' INT TERM

# --- the session ------------------------------------------------------------------------------
say "gpu_session: commit $COMMIT, budget ${BUDGET}s, quick=$QUICK, only=${ONLY:-all}, OUT=$OUT"
if [[ -d $REPO/.whl ]] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  say "installing carried wheels from .whl/ into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

run_stage env "$DEADLINE" bash -c stage_env
IFS=$'\t' read -r _ HAS_CUDA SLUG GPU_NAME < <(grep '^VARS' "$S/logs/env.log")
HAS_CUDA=${HAS_CUDA:-0} SLUG=${SLUG:-cpu} GPU_NAME=${GPU_NAME:-no CUDA device}
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
export SLUG
if [[ $HAS_CUDA == 0 ]]; then
  say "no CUDA device: torch.cuda.is_available() is False; GPU tests will skip, benchmarks will not measure"
fi

BUILD_FAILED=0
if selected build; then
  run_stage build "$DEADLINE" bash -c stage_build
  [[ ${RCS[build]} == 0 ]] || BUILD_FAILED=1
else
  # No build this run: say what is installed, run on regardless (the stages skip themselves).
  run_stage extension "$DEADLINE" bash -c stage_check_extension
  [[ ${RCS[extension]} == 0 ]] || say "WARNING: no usable CUDA extension installed: gpu tests will skip, kernel benchmarks exit 77"
fi

if [[ $BUILD_FAILED == 1 ]]; then
  say "BUILD FAILED: skipping tests and benchmarks (logs/build.log in the tarball)"
  skip_rest "build failed"
  finish
  exit 1
fi

start_cpp_build

TESTS_DEADLINE=$(( $(date +%s) + TESTS_BUDGET ))
KERNEL_TESTS=(kernels attention sm90 w4a16 sparse blockffn graphs)
# The test modules of each kernel family's stage (GPU-only modules, or device-parametrized ones
# whose `gpu` cases run here and whose `emulated` cases run in CI), and the CUDA-graph tests in a
# process of their own (a capture gone wrong cannot take the other tests down).
declare -A KERNEL_FILES=([kernels]="test_ops_kernels.py"
                         [attention]="test_attention_kernels.py test_invariant_attention_kernels.py"
                         [sm90]="test_attention_sm90_kernels.py"
                         [w4a16]="test_w4a16_kernels.py test_dense_gemm_kernels.py" [sparse]="test_sparse_kernels.py"
                         [blockffn]="test_blockffn_kernels.py test_blockffn_w4a16_kernels.py"
                         [graphs]="test_cuda_graphs.py test_cuda_graphs_sparse.py")
IGNORES=()
for k in "${KERNEL_TESTS[@]}"; do
  files=()
  for f in ${KERNEL_FILES[$k]}; do files+=("$REPO/tests/$f"); IGNORES+=("--ignore=$REPO/tests/$f"); done
  run_tests "tests_$k" 0 "${files[@]}"
done
run_tests tests_other 1 "$REPO/tests" --continue-on-collection-errors "${IGNORES[@]}"

finish_cpp_build   # before any timing: no compiler competes with the benchmarks
CPP_OK=0   # binaries from this run's cpp_build, or from an earlier run when it did not run
[[ ${ST[cpp_build]:-ok} == ok && -x $CPP_DIR/bench/cpp/bench_w4a16 ]] && CPP_OK=1

# Attention: each model's trees right after its decode steps (their ratio is issue #4's tree
# target), before its prefill, in case the stage's limit cuts the run short.
if [[ $QUICK == 1 ]]; then
  run_bench bench_attention bench/python/bench_attention.py --quick --phases decode,tree,prefill
  run_bench bench_w4a16 bench/python/bench_w4a16.py --models llama3-1b,llama3-8b --rows 1,16
  run_bench bench_sparse bench/python/bench_sparse.py --quick
  run_bench bench_blockffn bench/python/bench_blockffn.py --device cuda --tokens 1,32 --repeats 20
else
  run_bench bench_attention bench/python/bench_attention.py --phases decode,tree,prefill
  W4A16_CPP=()
  [[ $CPP_OK == 1 ]] && W4A16_CPP=(--cpp "$CPP_DIR/bench/cpp/bench_w4a16")
  run_bench bench_w4a16 bench/python/bench_w4a16.py "${W4A16_CPP[@]}"
  run_bench bench_sparse bench/python/bench_sparse.py
  run_bench bench_blockffn bench/python/bench_blockffn.py --device cuda
  if selected cpp_bench; then
    if [[ $CPP_OK == 1 ]]; then
      touch "$WORK/mark.cpp_bench"
      run_stage cpp_bench "$DEADLINE" bash -c stage_cpp_bench
      find "$REPO/bench/results" -name '*.json' -newer "$WORK/mark.cpp_bench" -exec cp -f {} "$S/results/" \;
    else
      record cpp_bench skip - 0 "C++ binaries not built (cpp_build: ${ST[cpp_build]:-not run})"
    fi
  fi
fi

DEMO_MISSING=$(python3 "$HELPER" demo 2>&1 | tail -n 1)
for n in bench_e2e bench_spec bench_spec_graphs bench_spec_sampling bench_structured bench_prefix_cache; do
  if selected "$n" && [[ -n $DEMO_MISSING ]]; then record "$n" skip - 0 "$DEMO_MISSING"; fi
done
if [[ -z $DEMO_MISSING ]]; then
  if [[ $QUICK == 1 ]]; then
    run_bench bench_e2e bench/python/bench_e2e.py --device cuda --new-tokens 64 --repeats 1
    run_bench bench_spec bench/python/bench_spec.py --device cuda --limit 3
    run_bench bench_spec_graphs bench/python/bench_spec.py --device cuda --limit 2 --cuda-graphs
  else
    run_bench bench_e2e bench/python/bench_e2e.py --device cuda --repeats 2
    run_bench bench_spec bench/python/bench_spec.py --device cuda
    run_bench bench_spec_graphs bench/python/bench_spec.py --device cuda --limit 3 --cuda-graphs
    # Sampled speculation (T 0.8, top-p 0.9: the nucleus-floor kernel on every tree row) against
    # plain sampling.
    run_bench bench_spec_sampling bench/python/bench_spec.py --device cuda --limit 3 --temperature 0.8 --top-p 0.9
    # Structured output: the grammar's host milliseconds per verification step of the GPU tree,
    # rows masked where acceptance needs them against every row masked (exits 77 without llguidance).
    run_bench bench_structured bench/python/bench_structured.py --device cuda --limit 2 --new-tokens 160 \
      --cases greedy-gpu-tree,sampled-gpu-tree,drafts-greedy-gpu-tree
    # Prefix caching: each chat turn's time to first token against its whole prefill.
    run_bench bench_prefix_cache bench/python/bench_prefix_cache.py --device cuda --speculation
  fi
fi
# Last, as no issue's target depends on them: the top-p kernel against the sort it replaced, then
# GGUF loading.
if [[ $QUICK == 1 ]]; then
  run_bench bench_sampling bench/python/bench_sampling.py --cases llama3 --rows 1,64 --repeats 20
else
  run_bench bench_sampling bench/python/bench_sampling.py
fi
# GGUF loading: each block type's dequantisation (gguf's numpy on the host vs torch on the GPU) and,
# where the demo model is here, its whole load.
GGUF_LOAD_ARGS=(--device cuda)
[[ -n $DEMO_MISSING ]] && GGUF_LOAD_ARGS+=(--no-load)
if [[ $QUICK == 1 ]]; then
  run_bench bench_gguf_load bench/python/bench_gguf_load.py "${GGUF_LOAD_ARGS[@]}" --shapes 4096x4096 --repeats 2
else
  run_bench bench_gguf_load bench/python/bench_gguf_load.py "${GGUF_LOAD_ARGS[@]}"
fi

RC=0
for n in "${ORDER[@]}"; do [[ ${ST[$n]} == FAIL || ${ST[$n]} == TIMEOUT ]] && RC=1; done
finish
exit "$RC"

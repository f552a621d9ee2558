#!/usr/bin/env bash
# Builds the threaded stress driver (native/stress/driver.c) with the segment core twice -- under
# ThreadSanitizer, and under AddressSanitizer + UndefinedBehaviorSanitizer -- and runs each build over a few
# configurations; then the driver of the C envs' batch loops (native/stress/env_driver.c, one thread) under
# AddressSanitizer + UndefinedBehaviorSanitizer.  Fails on any sanitizer report or driver violation.
#
#   bash native/stress/sanitize.sh [seconds per run (default 5)]
#
# Environment: CC (default gcc), SEGVEC_STRESS_SEED (first seed, default 1; run i uses seed + i).
# The last line is "sanitizers: N runs, R reports" (exit status 0 only with R = 0 and every driver run ok).
set -u

seconds="${1:-5}"
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [seconds per run]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 2
cc="${CC:-gcc}"
seed="${SEGVEC_STRESS_SEED:-1}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/segvec-sanitize.XXXXXX")" || exit 2
trap 'rm -rf "$tmp"' EXIT

export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

common=(-std=c11 -O1 -g -pthread -Inative native/stress/driver.c native/segvec.c -lm)
builds=(tsan asan)
declare -A flags=(
    [tsan]="-fsanitize=thread"
    [asan]="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
)
for name in "${builds[@]}"; do
    # shellcheck disable=SC2086  # the flags are words
    if ! "$cc" ${flags[$name]} "${common[@]}" -o "$tmp/driver-$name" 2>"$tmp/build-$name.log"; then
        cat "$tmp/build-$name.log" >&2
        echo "sanitizers: build with ${flags[$name]} failed" >&2
        echo "sanitizers: 0 runs, 0 reports (build failed)"
        exit 1
    fi
done
env_sources=(native/stress/env_driver.c native/segvec.c native/segvec_env.c native/envs/cartpole.c
             native/envs/synthetic_atari.c)
# shellcheck disable=SC2086  # the flags are words
if ! "$cc" ${flags[asan]} -std=c11 -O1 -g -pthread -Inative "${env_sources[@]}" -lm -o "$tmp/env-driver-asan" \
        2>"$tmp/build-env-asan.log"; then
    cat "$tmp/build-env-asan.log" >&2
    echo "sanitizers: build of the env driver failed" >&2
    echo "sanitizers: 0 runs, 0 reports (build failed)"
    exit 1
fi

# num_envs num_workers horizon num_segments
configs=("8 4 2 16" "6 3 1 12" "16 2 5 64")
heads=(1 3 2)  # value heads of each configuration (the driver's last argument)
# What a sanitizer report starts with.
report_pattern='^(WARNING: ThreadSanitizer|==[0-9]+==ERROR: (AddressSanitizer|LeakSanitizer)|.*: runtime error: |SUMMARY: UndefinedBehaviorSanitizer)'
# ThreadSanitizer cannot start with some address-space layouts ("unexpected memory mapping" on newer
# kernels with high mmap randomization); such a run is repeated with ASLR off.
no_aslr=()
limit=$((seconds * 3 + 120))  # a hung run is a failure, not a stuck script
runs=0
reports=0
failed=0
run_index=0
for name in "${builds[@]}"; do
    for index in "${!configs[@]}"; do
        config=${configs[$index]}
        run_seed=$((seed + run_index))
        run_index=$((run_index + 1))
        log="$tmp/run-$name-$run_index.log"
        # shellcheck disable=SC2086  # config is four numbers
        cmd=("$tmp/driver-$name" "$seconds" $config "$run_seed" "${heads[$index]}")
        if command -v timeout >/dev/null; then cmd=(timeout "$limit" "${cmd[@]}"); fi
        if [ "$name" = tsan ] && [ ${#no_aslr[@]} -gt 0 ]; then cmd=("${no_aslr[@]}" "${cmd[@]}"); fi
        "${cmd[@]}" >"$log" 2>&1
        rc=$?
        if [ "$name" = tsan ] && [ ${#no_aslr[@]} -eq 0 ] && grep -q "unexpected memory mapping" "$log"; then
            no_aslr=(setarch "$(uname -m)" -R)
            echo "sanitizers: ThreadSanitizer needs ASLR off here; running it under ${no_aslr[*]}"
            "${no_aslr[@]}" "${cmd[@]}" >"$log" 2>&1
            rc=$?
        fi
        runs=$((runs + 1))
        found=$(grep -cE "$report_pattern" "$log")
        reports=$((reports + found))
        summary=$(grep -E '^segvec stress ' "$log" | tail -n 1)
        if [ "$rc" -ne 0 ] || [ "$found" -ne 0 ] || [ -z "$summary" ]; then
            failed=1
            echo "---- $name envs/workers/horizon/segments = $config, value heads ${heads[$index]}, seed $run_seed: exit status $rc, $found sanitizer report(s)"
            if [ "$rc" -eq 124 ]; then echo "(killed after ${limit} s: the driver hung)"; fi
            head -c 20000 "$log"
            echo "----"
        else
            echo "$name: $summary"
        fi
    done
done
# num_envs horizon
env_configs=("8 5" "1 1" "16 3")
for config in "${env_configs[@]}"; do
    run_seed=$((seed + run_index))
    run_index=$((run_index + 1))
    log="$tmp/run-env-asan-$run_index.log"
    # shellcheck disable=SC2086  # config is two numbers
    cmd=("$tmp/env-driver-asan" "$seconds" $config "$run_seed")
    if command -v timeout >/dev/null; then cmd=(timeout "$limit" "${cmd[@]}"); fi
    "${cmd[@]}" >"$log" 2>&1
    rc=$?
    runs=$((runs + 1))
    found=$(grep -cE "$report_pattern" "$log")
    reports=$((reports + found))
    summary=$(grep -E '^segvec env driver: ' "$log" | tail -n 1)
    if [ "$rc" -ne 0 ] || [ "$found" -ne 0 ] || [ -z "$summary" ]; then
        failed=1
        echo "---- env driver, envs/horizon = $config, seed $run_seed: exit status $rc, $found sanitizer report(s)"
        head -c 20000 "$log"
        echo "----"
    else
        echo "asan: $summary"
    fi
done
echo "sanitizers: $runs runs, $reports reports"
if [ "$failed" -ne 0 ] || [ "$reports" -ne 0 ]; then exit 1; fi
exit 0

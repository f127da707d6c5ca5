#!/usr/bin/env bash
# Fuzzing the loaders with cargo-fuzz (nightly, AddressSanitizer). Targets: fuzz/fuzz_targets,
# bodies in tests/src/fuzz.rs; corpora in fuzz/corpus/<target> (committed, replayed by the test
# suite on stable Rust: tests/tests/fuzz_replay.rs).
#
#   tools/fuzz.sh run [seconds] [target...]   fuzz each target (default 300 s), new inputs go
#                                             into its corpus; prints execs, crashes, peak RSS
#   tools/fuzz.sh ci                          10 s per target when nightly and cargo-fuzz are
#                                             there (CI); otherwise says so and does nothing
#   tools/fuzz.sh cmin [target...]            minimizes the corpora (seeds merged in; at most
#                                             2 MB each, smallest inputs first)
#
# Memory limits make allocation bombs crashes: -rss_limit_mb=2048 -malloc_limit_mb=1024.
# Crashing inputs land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(gguf safetensors llm_config diffusers_config tokenizer_gguf tokenizer_json npy chat_template)
LIMITS=(-rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -max_len=262144)

seeds() {
    # Seeds come from the fixtures through the libraries that write the formats; without those
    # Python packages the committed corpora alone are the starting point.
    if python3 -c 'import gguf, safetensors, numpy' 2>/dev/null; then
        python3 tools/make_fuzz_seeds.py >/dev/null
    fi
}

run() {
    local secs=$1
    shift
    local targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
    seeds
    cargo +nightly fuzz build >/dev/null
    # "last new": the exec count at which the corpus last grew; "cov at ½": the coverage when
    # half the execs had run (a plateau when cov barely grew over the second half).
    printf '%-18s %12s %10s %8s %8s %9s %12s %s\n' target execs "execs/s" "rss MB" cov "cov at ½" "last new" result
    local failed=0
    for t in "${targets[@]}"; do
        mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
        local log
        log=$(mktemp)
        local rc=0
        cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
            "${LIMITS[@]}" -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
        local execs rss cov last
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
        cov=$( (grep -o 'cov: [0-9]*' "$log" || true) | tail -1 | cut -d' ' -f2)
        # (A short run may end before the corpus is loaded: no such lines, no failure.)
        last=$( (grep -E '^#[0-9]+[[:space:]]+NEW' "$log" || true) | tail -1 | awk '{print substr($1, 2)}')
        half=$( (grep -E '^#[0-9]+[[:space:]].*cov: [0-9]+' "$log" || true) |
            awk -v h="$(( ${execs:-0} / 2 ))" '{n = substr($1, 2) + 0; if (n <= h) { match($0, /cov: [0-9]+/); c = substr($0, RSTART + 5, RLENGTH - 5) } } END { print c }')
        local result=ok
        if [ $rc -ne 0 ]; then
            result="CRASH (see fuzz/artifacts/$t; log $log)"
            failed=1
            grep -E 'ERROR|panicked|SUMMARY' "$log" | head -5 || true
        else
            rm -f "$log"
        fi
        printf '%-18s %12s %10s %8s %8s %9s %12s %s\n' "$t" "${execs:-?}" "$(( ${execs:-0} / secs ))" "${rss:-?}" "${cov:-?}" "${half:-?}" "${last:-?}" "$result"
    done
    return $failed
}

case "${1:-run}" in
run)
    shift || true
    secs=${1:-300}
    shift || true
    run "$secs" "$@"
    ;;
ci)
    if cargo +nightly --version >/dev/null 2>&1 && command -v cargo-fuzz >/dev/null; then
        run 10
    else
        echo "fuzz: nightly Rust or cargo-fuzz missing; the corpora are replayed by the test suite only"
    fi
    ;;
cmin)
    shift
    targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
    seeds
    for t in "${targets[@]}"; do
        mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
        rm -rf "fuzz/corpus/$t.min"
        mkdir "fuzz/corpus/$t.min"
        cargo +nightly fuzz run "$t" "fuzz/corpus/$t.min" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
            -merge=1 "${LIMITS[@]}" >/dev/null 2>&1
        # Named regression inputs stay whatever the merge thinks of them.
        cp fuzz/corpus/"$t"/regression-* "fuzz/corpus/$t.min/" 2>/dev/null || true
        rm -rf "fuzz/corpus/$t"
        mv "fuzz/corpus/$t.min" "fuzz/corpus/$t"
        # The committed corpus stays small: past 2 MB, the largest inputs go (a tokenizer seed
        # is tens of KB; the local fuzzing corpus keeps them in fuzz/seeds).
        total=0
        while read -r size f; do
            total=$((total + size))
            case "$f" in */regression-*) continue ;; esac
            [ $total -le 2000000 ] || rm "$f"
        done < <(find "fuzz/corpus/$t" -type f -printf '%s %p\n' | sort -n)
        echo "$t: $(ls "fuzz/corpus/$t" | wc -l) inputs, $(du -sb "fuzz/corpus/$t" | cut -f1) bytes"
    done
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac

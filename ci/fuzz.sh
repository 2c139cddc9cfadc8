#!/usr/bin/env bash
# Builds every cargo-fuzz target of fuzz/ (each [[bin]] of fuzz/Cargo.toml) on stable Rust
# and runs each for a bounded time from its seed corpus; fails if any target crashes,
# panics, overflows, times out on one input or runs out of memory, printing the input.
#
#   ci/fuzz.sh [TARGET...]      all targets when none is named
#   FUZZ_SECONDS=N              seconds per target (default 30; 0 = no time limit)
#   FUZZ_RUNS=N                 at most N executions per target (default: no limit)
#
# What it needs besides Rust: a C++ compiler (g++), because libfuzzer-sys compiles libFuzzer
# from source. The build goes to $CARGO_TARGET_DIR/fuzz (default target/fuzz), so a CI cache
# of the target dir keeps it. docs/FUZZING.md says more.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
runs=${FUZZ_RUNS:-}
for n in "$seconds" ${runs:+"$runs"}; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "FUZZ_SECONDS and FUZZ_RUNS take a whole number, not '$n'" >&2; exit 2; }
done
if [ "$seconds" = 0 ] && [ -z "$runs" ]; then
  echo "FUZZ_SECONDS=0 runs without a time limit: give FUZZ_RUNS too" >&2
  exit 2
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
# The cc crate compiles libFuzzer with $CXX, else c++ (on Debian, g++ provides it).
cxx=${CXX:-c++}
if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "no C++ compiler ($cxx): libfuzzer-sys compiles libFuzzer from C++ source; install it with: apt-get install g++" >&2
  exit 1
fi

# The targets: the [[bin]] names of fuzz/Cargo.toml, so a new target needs no change here.
mapfile -t all < <(awk '/^\[\[bin\]\]/ { bin = 1; next }
                        /^\[/ { bin = 0 }
                        bin && /^name *=/ { gsub(/^name *= *"|".*$/, ""); print }' fuzz/Cargo.toml)
[ ${#all[@]} -gt 0 ] || { echo "no [[bin]] in fuzz/Cargo.toml" >&2; exit 1; }
if [ $# -gt 0 ]; then
  for t in "$@"; do
    [[ " ${all[*]} " == *" $t "* ]] || { echo "no fuzz target '$t' (there are: ${all[*]})" >&2; exit 2; }
  done
  targets=("$@")
else
  targets=("${all[@]}")
fi

target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target"
target=$(readlink -f "$target")
out=$target/fuzz
host=$(rustc -vV | sed -n 's/^host: //p')

# What cargo-fuzz does on nightly, on stable: LLVM's SanitizerCoverage instrumentation that
# libFuzzer reads (inline 8-bit counters, the PC table, comparison tracing), and the `fuzzing`
# cfg that libfuzzer-sys and some crates check. No sanitizer: those need nightly. The explicit
# --target keeps these flags off build scripts and proc macros, which would otherwise fail to
# link (undefined __sanitizer_cov_*). Debug assertions and overflow checks are on in the fuzz
# crate's release profile.
flags=(--cfg fuzzing -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "=== building fuzz targets ${targets[*]} ($out)"
start=$SECONDS
# CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS; CARGO_BUILD_TARGET over nothing here.
(cd fuzz && env -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS RUSTFLAGS="${flags[*]}" \
  cargo build --release --locked --target "$host" --target-dir "$out" "${bins[@]}")
echo "built in $((SECONDS - start)) s"

# Each run works on a copy of the seeds, so the inputs it finds do not land in the repo.
scratch=$(mktemp -d "$out/run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
artifacts=$out/artifacts
mkdir -p "$artifacts"

# The options of fuzz/options/TARGET.options ([libfuzzer] section, `key = value` lines).
options() {
  local file=fuzz/options/$1.options
  [ -f "$file" ] || return 0
  awk '/^\[/ { lib = ($0 == "[libfuzzer]"); next }
       lib && /=/ { gsub(/[ \t]/, ""); split($0, kv, "="); print "-" kv[1] "=" kv[2] }' "$file"
}

# Prints a failing input for the log: its base64 (to paste into `base64 -d`) and a hex dump.
show_input() {
  local f=$1 size
  size=$(wc -c <"$f")
  echo "--- input ($size bytes), base64:"
  base64 -w 76 "$f"
  echo "--- hex (first 512 bytes):"
  head -c 512 "$f" | od -A x -t x1z -v
}

failed=()
passed=0
summary=()
for t in "${targets[@]}"; do
  bin=$out/$host/release/$t
  corpus=$scratch/$t/corpus
  mkdir -p "$corpus" "$scratch/$t/artifacts"
  if [ -d "fuzz/corpus/$t" ]; then cp -R "fuzz/corpus/$t/." "$corpus/"; fi
  mapfile -t opts < <(options "$t")
  [ -f "fuzz/dict/$t.dict" ] && opts+=("-dict=fuzz/dict/$t.dict")
  # -timeout: one input taking this long is a hang, and fails the run (libFuzzer's own
  # default is 20 minutes). -rss_limit_mb: memory that grows without bound fails it too.
  # Later options win, so a target's options file may change these.
  args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
    -artifact_prefix="$scratch/$t/artifacts/" "${opts[@]}")
  [ -n "$runs" ] && args+=(-runs="$runs")
  log=$scratch/$t.log
  echo
  limit=$([ "$seconds" = 0 ] && echo "no time limit" || echo "${seconds}s")
  echo "=== fuzzing $t: $limit${runs:+, at most $runs runs} ${opts[*]}"
  status=0
  "$bin" "${args[@]}" "$corpus" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  # The last status line: "#N ... cov: E ft: F corp: U/S ...": E edges (PCs) covered, F
  # features (edges with hit counts and compared values).
  cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n 1 || true)
  line="$t: ${execs:-?} executions, ${rate:-?} exec/s, ${cov:-no coverage reported}"
  summary+=("$line")
  if [ "$status" = 0 ]; then
    echo "$line"
    passed=$((passed + 1))
    continue
  fi
  failed+=("$t")
  echo "FAILED: fuzz target $t (libFuzzer exit status $status); its output:"
  # The panic message and backtrace, or libFuzzer's word for a hang or memory, come last.
  tail -n 60 "$log"
  found=0
  for a in "$scratch/$t/artifacts"/*; do
    [ -f "$a" ] || continue
    found=1
    kept=$artifacts/$t-$(basename "$a")
    cp "$a" "$kept"
    echo
    echo "--- $t: $(basename "$a" | cut -d- -f1) input, kept as $kept"
    echo "    reproduce: $bin $kept"
    show_input "$a"
  done
  [ "$found" = 1 ] || echo "(libFuzzer wrote no input for this failure)"
done

echo
echo "=== fuzzing summary"
printf '%s\n' "${summary[@]}"
echo "${passed} passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failing fuzz targets: ${failed[*]}" >&2
  exit 1
fi

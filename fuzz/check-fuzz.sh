#!/usr/bin/env bash
# Run the fuzzing harnesses for a bounded time each (make check-fuzz).
#
#   check-fuzz.sh SRCDIR TARGET...
#
# Each ./fuzz-TARGET runs for FUZZ_SECONDS (default 60) over a copy of
# SRCDIR/corpus/TARGET (the tree's seeds stay as they are), with the
# dictionary SRCDIR/dict/TARGET.dict if there is one, FUZZ_JOBS
# harnesses at a time (default 1), with hang detection (-timeout), a
# memory limit and leak detection.  Anything a harness finds (a crash,
# a leak, a hang, an allocation beyond the limit) fails the run; the
# input that found it is kept in fuzz-out/TARGET/ with the log.  A
# summary gives each harness's executions.
set -uo pipefail

corpus="$1/corpus"
dicts="$1/dict"
shift
seconds="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-1}"
out="$PWD/fuzz-out"

rm -rf "$out"
mkdir -p "$out"
# The harnesses' own files (stores, maps): in memory, and under a short
# path (a store's control socket must fit in sockaddr_un).
shm=/dev/shm
[ -d "$shm" ] && [ -w "$shm" ] || shm=/tmp
FUZZ_TMPDIR="$(mktemp -d "$shm/check-fuzz.XXXXXX")"
export FUZZ_TMPDIR
trap 'rm -rf "$FUZZ_TMPDIR"' EXIT
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"

run_one ()
{
  local t="$1" dir="$out/$1"
  local -a dict=()

  mkdir -p "$dir/corpus"
  if [ -d "$corpus/$t" ]; then
    cp -r "$corpus/$t/." "$dir/corpus/"
  fi
  if [ -f "$dicts/$t.dict" ]; then
    dict=(-dict="$dicts/$t.dict")
  fi
  # -rss_limit_mb: the harnesses need a few hundred MiB at most;
  # -malloc_limit_mb: one allocation past this is a corrupt length.
  ./fuzz-"$t" \
      -max_total_time="$seconds" -timeout=10 \
      -rss_limit_mb=2048 -malloc_limit_mb=1024 \
      -print_final_stats=1 -artifact_prefix="$dir/" "${dict[@]}" \
      "$dir/corpus" > "$dir/log" 2>&1
  echo $? > "$dir/status"
}

running=0
for t in "$@"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait

fail=0
printf '%-12s %12s  %s\n' harness executions result
for t in "$@"; do
  dir="$out/$t"
  status="$(cat "$dir/status" 2>/dev/null || echo 1)"
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" |
           tail -1)"
  if [ "$status" -eq 0 ]; then
    result=ok
  else
    result="FAILED (exit status $status): see $dir/log"
    fail=1
  fi
  printf '%-12s %12s  %s\n' "$t" "${execs:-?}" "$result"
done
if [ "$fail" -ne 0 ]; then
  for t in "$@"; do
    if [ "$(cat "$out/$t/status" 2>/dev/null || echo 1)" -ne 0 ]; then
      echo
      echo "=== fuzz-$t ==="
      tail -n 60 "$out/$t/log"
      ls "$out/$t" | grep -E '^(crash|leak|timeout|oom|slow-unit)-' || :
    fi
  done
  exit 1
fi
exit 0

# nbdkit-snapshot benchmarks: shell functions shared by bench/run,
# bench/merge and bench/cbt.  Sourced, not run.  The caller defines
# say and die (messages with its own prefix) before using these.
#
# Timing: a command's time must not include the benchmark's own
# processes.  Starting a process costs 5 to 10 ms on the machine the
# figures in docs/benchmarks.md come from, and jq 30 ms, which is as
# long as some of the merges measured.  So clocks are read from bash's
# EPOCHREALTIME, CPU time from bash's own "time", and files are synced
# by one sync(1) process.

# now_us VAR: set VAR to the wall clock in microseconds.  secs_since
# VAR T0 / ms_since VAR T0: set VAR to the seconds (3 decimals) or
# milliseconds (2 decimals) since T0, a now_us value.  They set a
# variable instead of printing, so that a caller needs no "$(...)"
# (a subshell, forked inside the interval).
now_us () { printf -v "$1" '%s' "${EPOCHREALTIME/./}"; }
secs_since () {
  local d=$((${EPOCHREALTIME/./} - $2))
  printf -v "$1" '%d.%03d' $((d / 1000000)) $((d / 1000 % 1000))
}
ms_since () {
  local d=$((${EPOCHREALTIME/./} - $2))
  printf -v "$1" '%d.%02d' $((d / 1000)) $((d / 10 % 100))
}

# The median of V... (the mean of the middle two for an even count).
median () {
  printf '%s\n' "$@" | sort -g |
    awk '{ v[NR] = $1 }
         END { if (NR % 2) print v[(NR + 1) / 2];
               else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# spread V...: (max - min) / median of V..., as "N%".  span V...:
# "min-max" of V..., 2 decimals.
spread () {
  local m
  m="$(median "$@")"
  printf '%s\n' "$@" | sort -g |
    awk -v m="$m" '{ v[NR] = $1 }
                   END { printf "%.0f%%", (m > 0 ? 100 * (v[NR] - v[1]) / m : 0) }'
}
span () {
  printf '%s\n' "$@" | sort -g |
    awk '{ v[NR] = $1 } END { printf "%.2f-%.2f", v[1], v[NR] }'
}

# ratio A B: A/B with 2 decimals, or - (A or B missing, B zero).
# le A B / ge A B: A (a ratio, - fails) at most / at least B.  yesno
# CMD...: "yes" if CMD succeeds, else a bold "no".
ratio () {
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a == "" || b == "" || a == "-" || b == "-" || b + 0 == 0) print "-";
    else printf "%.2f", a / b }'
}
le () { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "-" && a + 0 <= b + 0) }'; }
ge () { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "-" && a + 0 >= b + 0) }'; }
yesno () { if "$@"; then echo yes; else echo "**no**"; fi; }

# Ratios of paired samples: "A1 A2 ..." over "B1 B2 ..." (the same
# repetitions, in the same order), one per line.  A ratio of two
# figures measured side by side is steadier than the ratio of their
# medians on a machine whose speed drifts between repetitions.
paired_ratios () {
  local -a a b
  local i
  read -ra a <<<"$1"
  read -ra b <<<"$2"
  [ "${#a[@]}" -eq "${#b[@]}" ] || return 1
  for ((i = 0; i < ${#a[@]}; i++)); do
    ratio "${a[i]}" "${b[i]}"
    echo
  done
}

# median_ci V...: a 95% confidence interval of the median of the
# population V... was drawn from, distribution-free: "lo hi", the
# order statistics of ranks k and n + 1 - k, k the largest for which
# P(Binomial(n, 1/2) < k) <= 0.025 (at least 1: for n < 6, the range).
median_ci () {
  printf '%s\n' "$@" | sort -g |
    awk '{ v[NR] = $1 }
         END {
           n = NR; k = 1; c = 0; p = 0.5 ^ n
           for (i = 0; i < n; i++) {
             c += p                      # P(X <= i)
             if (c > 0.025) break
             k = i + 1
             p = p * (n - i) / (i + 1)
           }
           if (k > (n + 1) / 2) k = int((n + 1) / 2)
           print v[k], v[n + 1 - k] }'
}

# A row of a table of targets: target_row LABEL "A..." "B..." OP GOAL
# [GOAL-TEXT]: the paired ratios A/B (paired_ratios) as "| LABEL |
# median | 95% CI of the median | range | spread | GOAL-TEXT | met |";
# OP (ge or le) GOAL is met if the whole confidence interval meets it,
# not established if only the median does, not met if the median does
# not; OP - for a ratio shown for comparison only.  The spread is that
# of the ratios.
target_row () {
  local label="$1" op="$4" goal="${5:-}" text="${6:-}" m met q lo hi
  local -a v=()
  [ "$op" != - ] || text="${text:--}"
  while read -r q; do
    [ "$q" = - ] || v+=("$q")
  done < <(paired_ratios "$2" "$3")
  if [ "${#v[@]}" -eq 0 ]; then
    echo "| $label | - | - | - | - | ${text:-$op $goal} | - |"
    return 0
  fi
  m="$(ratio "$(median "${v[@]}")" 1)"
  read -r lo hi < <(median_ci "${v[@]}")
  if [ "$op" = - ]; then
    met=-
  elif "$op" "$lo" "$goal" && "$op" "$hi" "$goal"; then
    met=yes
  elif "$op" "$m" "$goal"; then
    met="not established (the median meets it, the CI does not)"
  elif "$op" "$lo" "$goal" || "$op" "$hi" "$goal"; then
    met="**no** in the median (the CI reaches the target)"
  else
    met="**no**"
  fi
  echo "| $label | $m | $lo-$hi | $(span "${v[@]}") | $(spread "${v[@]}") |" \
       "${text:-$op $goal} | $met |"
}

# cpu_of PID: the CPU seconds (user + system) process PID has used so
# far, 2 decimals.
cpu_of () {
  awk -v hz="$(getconf CLK_TCK)" '{
        # Fields after the command name, which is in parentheses.
        sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' \
    "/proc/$1/stat"
}

# Run a command; sets c_cpu to its CPU seconds (user + system), from
# bash's "time" (no GNU time process in between, no subshell).  The
# command's stderr goes to the caller's; TIMEFILE is a scratch file.
timed_cpu () {
  local TIMEFORMAT='%U %S' u s rc=0
  { time "$@" 2>&3 3>&- || rc=$?; } 3>&2 2>"$TIMEFILE"
  read -r u s <"$TIMEFILE"
  c_cpu="$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.2f", u + s }')"
  return $rc
}

# sync(1), in one process, the regular files and directories named and
# those in the directories named (not sockets: sync cannot open them).
sync_files () {
  local f g list=()
  for f in "$@"; do
    [ -f "$f" ] || [ -d "$f" ] || continue
    list+=("$f")
    [ -d "$f" ] || continue
    for g in "$f"/* "$f"/.[!.]*; do
      [ -f "$g" ] && list+=("$g")
    done
  done
  [ "${#list[@]}" -eq 0 ] || sync "${list[@]}"
}

# Bytes read from disk so far, by every process (/proc/vmstat pgpgin,
# in KiB): the difference over a run shows whether it read from the
# page cache.
disk_read_kib () { awk '$1 == "pgpgin" { print $2 }' /proc/vmstat; }

# Read FILE... into the page cache (outside any timing): what a run
# reads then comes from memory for every contender alike, not from
# disk for whichever runs first after DAMON or another run evicted it.
warm () {
  local f
  for f in "$@"; do
    [ -f "$f" ] && cat "$f" >/dev/null
  done
  return 0
}

# BENCH_PAUSE_DAMON=1: stop the kernel's DAMON monitors for the run
# (pause_damon), start them again at the end (resume_damon, from the
# caller's exit trap).  paused_damon lists those stopped.
paused_damon=()
pause_damon () {
  local k
  for k in /sys/kernel/mm/damon/admin/kdamonds/[0-9]*; do
    [ "$(cat "$k/state" 2>/dev/null)" = on ] || continue
    echo off >"$k/state" ||
      die "cannot stop DAMON ($k/state): BENCH_PAUSE_DAMON=1 needs root"
    paused_damon+=("$k")
    say "DAMON monitor ${k##*/} stopped for the run"
  done
}
resume_damon () {
  local k
  for k in "${paused_damon[@]}"; do
    echo on >"$k/state" || say "WARNING: could not start $k again"
  done
  paused_damon=()
}
# A line for the results file, if DAMON was stopped.
damon_note () {
  [ "${#paused_damon[@]}" -gt 0 ] || return 0
  echo "- DAMON stopped during the run (BENCH_PAUSE_DAMON=1):" \
       "kdamonds ${paused_damon[*]##*/}"
}

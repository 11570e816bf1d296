#!/usr/bin/env bash
# nbdkit-snapshot
# Crash soak, bounded: tests/soak/soak.py runs random I/O, checkpoints,
# deletes and reverts against a model and kills nbdkit with SIGKILL at
# random moments (between operations, with writes in flight, just
# after a control request, during a job), then restarts it on the same
# store and checks guarantees 1 to 4 (see the comment at the top of
# soak.py).  Both kinds of store.  First the self-test: a deliberately
# wrong model must be caught by each check.
#
# The bounded run of make check uses a fixed seed (the same operations
# and kill points every time; where a signal lands still depends on
# timing); a long run (SOAK_MINUTES) takes a random one.  SOAK_SEED
# sets it.  The seed is printed, and
#   tests/soak/soak.py --seed N --rounds R --mode M
# replays a run.  SOAK_ROUNDS (rounds per mode, default 100),
# SOAK_MINUTES (instead of rounds) and SOAK_MODE (row, cbw or both)
# change the run; "make check-soak SOAK_MINUTES=30" runs a long one.
#
# Then the same soak with power loss (--power-loss): the origin and the
# store on tests/powerfs, a file system that keeps only what was synced
# (and, at random, some of what was not); each kill is followed by a
# crash of the file system and a restart in "another boot".  The same
# checks.  SOAK_POWER_ROUNDS (default 150) or SOAK_POWER_MINUTES
# (default SOAK_MINUTES) size it; it needs root, /dev/fuse and powerfs
# (built when libfuse3 is found), and is left out without them.
#
# Under valgrind (make check-valgrind) the rounds default to 10 per
# kind and mode: every round restarts nbdkit, which takes seconds
# there.

source ./functions.sh
set -e
set -x

requires python3 -c 'import nbd'
requires nbdkit file --version

rounds=100 power_rounds=150
if [ "${SNAPSHOT_TEST_VALGRIND:-0}" = 1 ]; then
    rounds=10 power_rounds=10
fi
if [ -z "${SOAK_SEED-}" ] && [ -z "${SOAK_MINUTES-}" ]; then
    SOAK_SEED=575475856
fi
args=(--mode "${SOAK_MODE:-both}" --tmpdir "$tmp" --top "$abs_top_builddir")
if [ -n "${SOAK_SEED-}" ]; then
    args+=(--seed "$SOAK_SEED")
fi
power_args=("${args[@]}" --power-loss)
if [ -n "${SOAK_MINUTES-}" ]; then
    args+=(--minutes "$SOAK_MINUTES")
    power_args+=(--minutes "${SOAK_POWER_MINUTES:-$SOAK_MINUTES}")
else
    args+=(--rounds "${SOAK_ROUNDS:-$rounds}")
    if [ -n "${SOAK_POWER_MINUTES-}" ]; then
        power_args+=(--minutes "$SOAK_POWER_MINUTES")
    else
        power_args+=(--rounds "${SOAK_POWER_ROUNDS:-$power_rounds}")
    fi
fi

# A short run that starts with the self-test, then the soak.
python3 "$abs_top_srcdir/tests/soak/soak.py" --self-test --mode both \
        --rounds 5 --tmpdir "$tmp" --top "$abs_top_builddir" ${SOAK_SEED:+--seed "$SOAK_SEED"}
python3 "$abs_top_srcdir/tests/soak/soak.py" "${args[@]}"

# With power loss, where powerfs can be mounted.
if [ "$(id -u)" -ne 0 ] || ! [ -c /dev/fuse ] ||
   ! [ -x "$abs_top_builddir/tests/powerfs/powerfs" ]; then
    echo "$0: power-loss soak left out: needs root, /dev/fuse and" \
         "tests/powerfs (libfuse3)"
    exit 0
fi
python3 "$abs_top_srcdir/tests/soak/soak.py" "${power_args[@]}"

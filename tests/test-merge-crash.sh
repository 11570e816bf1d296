#!/usr/bin/env bash
# nbdkit-snapshot
# Guarantee 4: a merge or revert interrupted by kill -9 leaves every
# view intact and finishes on restart.  Five rounds on one store, each
# killing the server at a random point inside its job (the point is
# printed; -D snapshot.job_hold=1 holds jobs, functions.sh.in, so the
# kill always lands inside, never after the end):
#   1. commit of the oldest snapshot into the origin;
#   2. stream of a middle snapshot (two layers merge);
#   3. revert to a snapshot;
#   4. commit of the newest snapshot (its layer is the live one);
#   5. stream of the oldest snapshot (the origin is retired).
# After each restart, before and after the resumed job ends, every
# remaining snapshot and the live volume read as saved.  In cbw mode
# the deletes move what each snapshot kept into the next older one (1
# and 5, of the oldest, just drop its layer) and 3 writes the origin
# back.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

start ()
{
    start_store -D snapshot.job_hold=1
}

# Random 64K writes over a fifth of the volume, seeded.
scribble ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
import random
rng = random.Random($1)
size = h.get_size()
for i in range(size // 65536 // 5):
    h.pwrite(rng.randbytes(65536), rng.randrange(0, size // 65536) * 65536)
h.flush()
"
}

# verify NAME...: each snap/NAME reads as saved; and the live volume.
verify ()
{
    verify_views $sock $tmp/live.img "$@"
}

# crash_round SEED NBDSNAP-ARGS...: start the job, kill -9 at a random
# point inside it (parked after n of its steps, or during the next one
# or parked after that: n is random, the rest is up to the machine),
# restart, check while the resumed job is held, let it finish, check
# again.
crash_round ()
{
    local seed=$1 id steps n
    shift
    nbdsnap -c $store "$@"
    id=$(last_job_field id)
    steps=$(min_steps $id)
    n=$(( steps > 0 ? seed % steps : 0 ))
    echo "kill -9 after $n of at least $steps steps of 1 MiB: $*"
    job_release $id $n
    wait_held $id $n
    if [ $(( n + 1 )) -lt $steps ]; then
        job_release $id 1
    fi
    stop_nbdkit $nbdkit_pid KILL
    grep -q '^job ' $store/manifest || fail "the journal lost job $id"
    start
    # The job resumes (held before its first step), then finishes.
    wait_held $id 0
    [ "$(last_job_field resumed)" = true ] || fail "job $id did not resume"
    verify "${remaining[@]}"
    job_release $id
    nbdsnap -c $store wait
    nbdsnap -c $store --json jobs > $tmp/jobs.json
    jq -e '.jobs[-1].state == "done" and .jobs[-1].resumed' $tmp/jobs.json ||
        fail "the job did not finish after the restart"
    verify "${remaining[@]}"
}

make_origin $origin 64M
start
for i in 1 2 3 4 5; do
    scribble $i
    nbdsnap -c $store create s$i
    save_export $sock snap/s$i $tmp/s$i.img
done
scribble 6
save_export $sock "" $tmp/live.img

remaining=(s2 s3 s4 s5)
crash_round $RANDOM delete s1 $(strategy commit)

remaining=(s2 s4 s5)
crash_round $RANDOM delete s3 $(strategy stream)

# After a revert the live volume is s4.
cp $tmp/s4.img $tmp/live.img
crash_round $RANDOM revert s4
nbdsnap -c $store --json list |
    jq -e '[.checkpoints[].name] == ["s2", "s4", "s5"]'

# A write after the revert, so the newest layer has fresh data.
scribble 7
save_export $sock "" $tmp/live.img
remaining=(s2 s4)
crash_round $RANDOM delete s5 $(strategy commit)

remaining=(s4)
crash_round $RANDOM delete s2 $(strategy stream)
if is_row; then grep -q '^origin retired$' $store/manifest; fi

# The journal is empty and a last restart reads the same.
! grep -q '^job ' $store/manifest
stop_nbdkit $nbdkit_pid
start
verify s4

#!/usr/bin/env bash
# nbdkit-snapshot
# A job gives way to clients (snapshot-job-rate): while a client is
# reading, a commit copies at most the rate; once the client stops, it
# goes at full speed and finishes.  With snapshot-job-rate=0 it is
# never held back.  No check depends on the machine's speed: the job
# is let go one step at a time after a client's read, and the rate is
# bounded from above over the job's own clock.  In cbw mode the job
# moves the 64 MiB s1 kept into the older snapshot s0 (taken only in
# that mode) instead of committing them.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
rate=$(( 4 << 20 ))

make_origin $origin 64M

# read_once: one 4K read of the live volume (a client request).
read_once ()
{
    nbdsh -u "$(nbd_uri $sock)" -c 'h.pread(4096, 0)'
}

# step_after_read JOB N: a client reads, then job JOB takes its Nth
# step and parks.  The job sees the request whatever the time between
# the two: it compares the count of requests, not the clock.
step_after_read ()
{
    read_once
    job_release $1 1
    wait_held $1 $2
}

# A store whose snapshot s1 has every block changed: a commit moves
# the whole 64 MiB (cbw: so does the delete of s1, into s0).
setup ()
{
    rm -rf $store
    start_store "$@"
    if is_cbw; then
        nbdsnap -c $store create s0
        save_export $sock snap/s0 $tmp/s0.img
    fi
    nbdsnap -c $store create s1
    nbdcopy -- [ nbdkit -r pattern 64M ] "$(nbd_uri $sock)"
    save_export $sock "" $tmp/live.img
}

# The snapshots left after the job, for verify_views: s0 in cbw mode.
if is_cbw; then left=(s0); else left=(); fi

# Held back while a client reads: the job says so.  Jobs are held (-D
# snapshot.job_hold=1: functions.sh.in) and let go one step at a time,
# each just after a read, so each step is taken with a client busy
# however slow the machine or the client.
setup -D snapshot.job_hold=1 -- snapshot-job-rate=$rate
nbdsnap -c $store delete s1 $(strategy commit)
job=$(last_job_field id)
wait_held $job 0
for i in 1 2 3 4; do
    step_after_read $job $i
    [ "$(last_job_field paced)" = true ] ||
        fail "step $i after a client read was not held back"
done
nbdsnap -c $store jobs | tee $tmp/jobs.txt
grep -F "held to snapshot-job-rate while clients are busy" $tmp/jobs.txt

# Once let go with no client, it finishes (clients idle: at full speed).
job_release $job
nbdsnap -c $store wait
[ "$(last_job_field state)" = done ]
[ "$(last_job_field paced)" = false ]
verify_views $sock $tmp/live.img "${left[@]}"
cmp $origin $tmp/live.img
stop_nbdkit $nbdkit_pid

# How much it copies when held back.  -D snapshot.job_busy=1 makes the
# job take clients to be busy all along, so the bound below does not
# depend on how often a client manages to send a request.  Each step is
# 1 MiB, the first is not held back, and a step is counted as it is
# copied, before the job sleeps: at most two steps ahead of the rate.
# The bound is on bytes copied over the job's own clock, from above, so
# a slow machine cannot break it.  The job is let go for 12 steps (3 s
# or more at the rate), so it is still running when last looked at.
setup -D snapshot.job_busy=1 -D snapshot.job_hold=1 -- snapshot-job-rate=$rate
nbdsnap -c $store delete s1 $(strategy commit)
job=$(last_job_field id)
wait_held $job 0
job_release $job 12
bound_holds ()
{
    local js
    js=$(nbdsnap -c $store --json jobs | jq -c '.jobs[-1]')
    echo "$js"
    jq -e --argjson rate $rate \
       '.bytes_done <= 2 * 1048576 + .elapsed_seconds * $rate' <<<"$js" ||
        fail "the job went faster than snapshot-job-rate: $js"
}
for i in 1 2 3 4 5; do
    bound_holds
done
wait_held $job 12
bound_holds
# The rate it reports is that of late: a window of 0.5 s has passed by
# now (12 steps at 4 MiB/s), and over it the rate is at most the limit
# and two steps (2 MiB) over the window.
js=$(nbdsnap -c $store --json jobs | jq -c '.jobs[-1]')
echo "$js"
jq -e --argjson rate $rate '.paced and .rate_bytes_per_second > 0 and
       .rate_bytes_per_second <= 3 * $rate' <<<"$js" ||
    fail "the job does not report the rate it is held to: $js"
# Stopping nbdkit stops the parked job, which stays in the journal.
stop_nbdkit $nbdkit_pid
grep -q '^job ' $store/manifest || fail "the stopped job left the journal"

# snapshot-job-rate=0: never held back, though a client reads before
# each step.
setup -D snapshot.job_hold=1 -- snapshot-job-rate=0
nbdsnap -c $store delete s1 $(strategy commit)
job=$(last_job_field id)
wait_held $job 0
for i in 1 2 3 4; do
    step_after_read $job $i
    [ "$(last_job_field paced)" = false ] ||
        fail "snapshot-job-rate=0, yet the job was held back"
done
job_release $job
nbdsnap -c $store wait
[ "$(last_job_field state)" = done ]
verify_views $sock $tmp/live.img "${left[@]}"
cmp $origin $tmp/live.img

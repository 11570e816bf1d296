#!/usr/bin/env bash
# nbdkit-snapshot
# A job gives way to clients (snapshot-job-rate): while a client is
# reading, a commit copies at most the rate; once the client stops, it
# goes at full speed and finishes.  With snapshot-job-rate=0 it is
# never held back.  The checks bound bytes copied from above, so a slow
# machine cannot make them fail.  In cbw mode the job moves the 64 MiB
# s1 kept into the older snapshot s0 (taken only in that mode) instead
# of committing them.

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

# reader: 4K reads of the live volume, in the background, until
# $tmp/stop exists (or 2 minutes pass); $tmp/reading appears after the
# first read.
reader ()
{
    rm -f $tmp/stop $tmp/reading
    nbdsh -u "$(nbd_uri $sock)" -c "
import os, random, time
size = h.get_size()
end = time.monotonic() + 120
n = 0
while not os.path.exists('$tmp/stop') and time.monotonic() < end:
    h.pread(4096, random.randrange(size // 4096) * 4096)
    n += 1
    if n == 1:
        open('$tmp/reading', 'w').close()
" &
    reader_pid=$!
    cleanup_fn kill $reader_pid
    wait_for test -e $tmp/reading
}

stop_reader ()
{
    touch $tmp/stop
    wait $reader_pid
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

paced () { [ "$(last_job_field paced)" = true ]; }

# The snapshots left after the job, for verify_views: s0 in cbw mode.
if is_cbw; then left=(s0); else left=(); fi

# Held back while a client reads: the job says so.  (-D
# snapshot.job_delay keeps the job from ending before the reader's
# requests are seen, on a loaded machine.)
setup -D snapshot.job_delay=20000 -- snapshot-job-rate=$rate
reader
nbdsnap -c $store delete s1 $(strategy commit)
wait_for paced
nbdsnap -c $store jobs | tee $tmp/jobs.txt
grep -F "held to snapshot-job-rate while clients are busy" $tmp/jobs.txt
[ "$(last_job_field state)" = running ] ||
    fail "the job ended while a client was reading"

# Once the client stops, the job finishes at full speed.
stop_reader
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
# The check bounds bytes copied from above, so a slow machine cannot
# make it fail.
setup -D snapshot.job_busy=1 -- snapshot-job-rate=$rate
nbdsnap -c $store delete s1 $(strategy commit)
wait_for paced
for i in 1 2 3 4 5; do
    js=$(nbdsnap -c $store --json jobs | jq -c '.jobs[-1]')
    echo "$js"
    [ "$(jq -r .state <<<"$js")" = running ] ||
        fail "the job ended at full speed: $js"
    jq -e --argjson rate $rate \
       '.bytes_done <= 2 * 1048576 + .elapsed_seconds * $rate' <<<"$js" ||
        fail "the job went faster than snapshot-job-rate: $js"
done
# The rate it reports is that of late: once a window of 0.5 s has
# passed, at most the limit and two steps (2 MiB) over the window.
elapsed_at_least () {
    nbdsnap -c $store --json jobs | jq -e ".jobs[-1].elapsed_seconds >= $1"
}
wait_for elapsed_at_least 1.2
js=$(nbdsnap -c $store --json jobs | jq -c '.jobs[-1]')
echo "$js"
jq -e --argjson rate $rate '.paced and .rate_bytes_per_second > 0 and
       .rate_bytes_per_second <= 3 * $rate' <<<"$js" ||
    fail "the job does not report the rate it is held to: $js"
# The commit would take 16 s at this rate: stop nbdkit, which leaves it
# in the journal.
stop_nbdkit $nbdkit_pid

# snapshot-job-rate=0: never held back.  -D snapshot.job_delay keeps
# the job running long enough to look at it while the client reads.
setup -D snapshot.job_delay=20000 -- snapshot-job-rate=0
reader
nbdsnap -c $store delete s1 $(strategy commit)
seen=0
while [ "$(last_job_field state)" = running ]; do
    [ "$(last_job_field paced)" = false ] ||
        fail "snapshot-job-rate=0, yet the job was held back"
    seen=$(( seen + 1 ))
done
[ $seen -gt 0 ] || fail "the job ended before it could be looked at"
stop_reader
[ "$(last_job_field state)" = done ]
verify_views $sock $tmp/live.img "${left[@]}"
cmp $origin $tmp/live.img

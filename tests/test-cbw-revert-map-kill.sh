#!/usr/bin/env bash
# nbdkit-snapshot
# A cbw revert keeps the pages it has written back in revert-ID.map,
# created just after the manifest names the job.  kill -9 can land
# while that file is being created, leaving it empty or with its header
# only: the next start makes it again, the revert resumes and finishes,
# and the live volume reads as the snapshot (guarantee 4).  The cut is
# made by truncating the map after a kill during the (slowed) revert.

SNAPSHOT_MODE=cbw
source ./functions.sh
set -e
set -x

requires nbdsh --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

start ()
{
    start_store -D snapshot.job_delay=${JOB_DELAY:-0}
}

make_origin $origin 8M
start
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/s1.img
nbdsh -u "$(nbd_uri $sock)" -c '
for off in range(0, h.get_size(), 1 << 20):
    h.pwrite(b"\xaa" * (1 << 20), off)
h.flush()
'

for cut in 0 4096; do
    stop_nbdkit $nbdkit_pid
    JOB_DELAY=500000 start
    nbdsnap -c $store revert s1
    id=$(last_job_field id)
    stop_nbdkit $nbdkit_pid KILL
    [ -f $store/revert-$id.map ] || fail "no revert-$id.map"
    truncate -s $cut $store/revert-$id.map
    start
    nbdsnap -c $store wait
    nbdsnap -c $store --json jobs > $tmp/jobs.json
    jq -e '.jobs[-1].state == "done" and .jobs[-1].resumed' $tmp/jobs.json
    verify_views $sock $tmp/s1.img s1
    # Changed again for the next round.
    nbdsh -u "$(nbd_uri $sock)" -c '
for off in range(0, h.get_size(), 1 << 20):
    h.pwrite(b"\x55" * (1 << 20), off)
h.flush()
'
done

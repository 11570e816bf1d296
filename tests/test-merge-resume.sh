#!/usr/bin/env bash
# nbdkit-snapshot
# A merge interrupted by kill -9 resumes from where it was, not from
# the start: the job's flusher syncs the layer it fills every 64 MiB
# copied, and each of those syncs writes the layer's map, which is the
# job's progress.  A stream of a 160 MiB volume is killed after its
# first such sync has reached the map file; on restart the resumed job
# has at most 160 - 64 MiB left to copy, and every view reads as saved
# before and after it ends.  In cbw mode the job is the delete of s1,
# which keeps the old contents of the whole volume, into s0: it fills
# s0's layer.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock

# Jobs are held (-D snapshot.job_hold=1: functions.sh.in): the kill
# comes while the job is parked after 72 of its 160 steps of 1 MiB.
start ()
{
    start_store -D snapshot.job_hold=1
}

make_origin $origin 160M
start
if is_cbw; then
    nbdsnap -c $store create s0
    save_export $sock snap/s0 $tmp/s0.img
    left_after=(s0)
    nbdsnap -c $store create s1
    # Every block changed: s1 keeps the old contents of all of them.
    nbdsh -u "$(nbd_uri $sock)" -c "
for off in range(0, h.get_size(), 1 << 20):
    h.pwrite(bytes([off >> 20 & 0xff]) * (1 << 20), off)
h.flush()
"
else
    left_after=()
    nbdsnap -c $store create s1
    # A few changed blocks: the stream copies everything else.
    nbdsh -u "$(nbd_uri $sock)" -c "
for i in range(8):
    h.pwrite(bytes([i + 1]) * 65536, i * 20 * 1024 * 1024)
h.flush()
"
fi
save_export $sock "" $tmp/live.img

# The map of the layer the job fills (row: the live one; cbw: s0's,
# the older) as it is on disk before the job.
map=$(ls $store/layer-*.map | sort -V | head -1)
[ "$(ls $store/layer-*.map | wc -l)" -eq $(( 1 + ${#left_after[@]} )) ] ||
    fail "expected $(( 1 + ${#left_after[@]} )) layer maps: $(ls $store)"
cp $map $tmp/map.before

nbdsnap -c $store delete s1 $(strategy stream)
job=$(last_job_field id)
total=$(last_job_field bytes_total)
[ "$total" -ge $(( 150 << 20 )) ] ||
    fail "the stream should copy about 160 MiB, plans $total bytes"

# Kill once the job's progress has reached the map file on disk: its
# flusher syncs once 64 MiB are copied.
job_release $job 72
wait_held $job 72
map_changed () { ! cmp -s $map $tmp/map.before; }
wait_for map_changed
[ "$(last_job_field state)" = running ] || fail "the job ended before the kill"
done_bytes=$(last_job_field bytes_done)
echo "killing with $done_bytes of $total bytes done"
stop_nbdkit $nbdkit_pid KILL
grep -q '^job ' $store/manifest

start
wait_held $job 0
verify_views $sock $tmp/live.img "${left_after[@]}"
left=$(last_job_field bytes_total)
echo "resumed with $left of $total bytes left"
[ "$(last_job_field resumed)" = true ] || fail "the job did not resume"
# The resumed job says what either way costs now: the stream what is
# left, a commit the 8 changed blocks and what was streamed so far
# (cbw: the move what is left).
nbdsnap -c $store --json jobs |
    jq -e --argjson left $left --argjson total $total \
       --arg m $snapshot_mode '.jobs[-1] |
        if $m == "cbw" then .move_bytes == $left
        else .stream_bytes == $left and
             .commit_bytes == $total - $left + 8 * 65536 end' ||
    fail "the resumed job does not give its costs"
[ "$left" -le $(( total - (64 << 20) )) ] ||
    fail "the resumed job copies $left bytes again: its progress was lost"

job_release $job
nbdsnap -c $store wait
[ "$(last_job_field state)" = done ] || fail "the resumed job did not finish"
if is_row; then grep -q '^origin retired$' $store/manifest; fi
verify_views $sock $tmp/live.img "${left_after[@]}"

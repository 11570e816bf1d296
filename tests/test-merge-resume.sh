#!/usr/bin/env bash
# nbdkit-snapshot
# A merge interrupted by kill -9 resumes from where it was, not from
# the start: the job's flusher syncs the layer it fills every 64 MiB
# copied, and each of those syncs writes the layer's map, which is the
# job's progress.  A stream of a 160 MiB volume is killed after its
# first such sync has reached the map file; on restart the resumed job
# has at most 160 - 64 MiB left to copy, and every view reads as saved
# before and after it ends.

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
    start_store -D snapshot.job_delay=30000
}

make_origin $origin 160M
start
nbdsnap -c $store create s1
# A few changed blocks: the stream copies everything else.
nbdsh -u "$(nbd_uri $sock)" -c "
for i in range(8):
    h.pwrite(bytes([i + 1]) * 65536, i * 20 * 1024 * 1024)
h.flush()
"
save_export $sock "" $tmp/live.img

# The live layer's map as it is on disk before the job.
map=$(ls $store/layer-*.map)
[ "$(echo "$map" | wc -l)" -eq 1 ] || fail "expected one layer map: $map"
cp $map $tmp/map.before

nbdsnap -c $store delete s1 --strategy=stream
total=$(last_job_field bytes_total)
[ "$total" -ge $(( 150 << 20 )) ] ||
    fail "the stream should copy about 160 MiB, plans $total bytes"

# Kill once the job's progress has reached the map file on disk.
map_changed () { ! cmp -s $map $tmp/map.before; }
wait_for map_changed
[ "$(last_job_field state)" = running ] ||
    fail "the job ended before the kill: slow it down further"
done_bytes=$(last_job_field bytes_done)
echo "killing with $done_bytes of $total bytes done"
stop_nbdkit $nbdkit_pid KILL
grep -q '^job ' $store/manifest

start
verify_views $sock $tmp/live.img
left=$(last_job_field bytes_total)
echo "resumed with $left of $total bytes left"
[ "$(last_job_field resumed)" = true ] || fail "the job did not resume"
# The resumed job says what either way costs now: the stream what is
# left, a commit the 8 changed blocks and what was streamed so far.
nbdsnap -c $store --json jobs |
    jq -e --argjson left $left --argjson total $total '.jobs[-1] |
        .stream_bytes == $left and
        .commit_bytes == $total - $left + 8 * 65536' ||
    fail "the resumed job does not give its costs"
[ "$left" -le $(( total - (64 << 20) )) ] ||
    fail "the resumed job copies $left bytes again: its progress was lost"

nbdsnap -c $store wait
[ "$(last_job_field state)" = done ] || fail "the resumed job did not finish"
grep -q '^origin retired$' $store/manifest
verify_views $sock $tmp/live.img

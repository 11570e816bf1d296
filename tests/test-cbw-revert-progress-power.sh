#!/usr/bin/env bash
# nbdkit-snapshot
# A cbw revert's saved progress never claims a page whose write into
# the origin a power loss can still take back.  A flush saves the
# progress: it takes the bits of the pages already back, flushes the
# origin, then writes the revert's map.  Here the job puts more pages
# back between that flush and the map's write
# (-D snapshot.revert_save_delay_ms), and the power goes right after
# the flush returns, so the origin loses those pages.  The map must
# not hold their bits (a map written with bits taken after the flush
# would): after the restart the resumed revert puts them back again,
# and the volume reads as the snapshot.  The origin and the store are
# both on powerfs (tests/powerfs).

SNAPSHOT_MODE=cbw
source ./functions.sh
set -e
set -x

requires_powerfs
requires nbdsh --version
requires jq --version

mnt=$tmp/mnt
origin=$mnt/origin.img
store=$mnt/store
sock=$tmp/nbd.sock

mount_powerfs $mnt
make_origin $origin 8M
sync $origin

start_store
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/s1.img
# Every page changes after s1 (flushed): the revert takes 8 steps of
# 1 MiB.
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\x5a" * (8 << 20), 0)
h.flush()
'
stop_nbdkit $nbdkit_pid

start_store -v -D snapshot.job_hold=1 -D snapshot.revert_save_delay_ms=5000
nbdsnap -c $store revert s1
id=$(last_job_field id)
[ "$(min_steps $id)" -eq 8 ]
wait_held $id 0
job_release $id 1
wait_held $id 1

# The flush saves the first step; while it waits after its origin
# flush, the job takes two more steps, which no flush covers.
nbdsh -u "$(nbd_uri $sock)" -c 'h.flush()' &
flush_pid=$!
wait_for grep -q "revert progress: origin flushed" $tmp/nbdkit.log
job_release $id 2
wait_held $id 3
kill -0 $flush_pid ||
    fail "the flush ended before the job's two steps: the test needs a longer revert_save_delay_ms on this machine"
wait $flush_pid

# The map on disk holds the first step, and only it: 256 pages.
bits=$(python3 - $store/revert-$id.map <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
# Header page, then the bitmap pages (8 MiB: 2048 bits, one page).
print(sum(bin(b).count("1") for b in data[4096:8192]))
EOF
)
[ "$bits" -eq 256 ] ||
    fail "the saved progress holds $bits pages, not the 256 of the first step"

stop_nbdkit $nbdkit_pid KILL
power_loss

start_store
nbdsnap -c $store wait
[ "$(last_job_field state)" = done ] ||
    fail "the resumed revert did not end well: $(last_job_field state)"
[ "$(export_md5 $sock)" = "$(md5 $tmp/s1.img)" ] ||
    fail "after the power loss the live volume does not read as s1"
stop_nbdkit $nbdkit_pid
cmp $origin $tmp/s1.img || fail "the origin does not hold s1"
check_clean $store

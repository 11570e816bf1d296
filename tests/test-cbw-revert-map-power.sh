#!/usr/bin/env bash
# nbdkit-snapshot
# A cbw revert's map (revert-N.map) does not outlive its job, even
# across a power loss.  The store is on powerfs (tests/powerfs), where
# an unlink is durable only once its directory is fsynced: the revert
# ends, then the power goes before anything else syncs the store
# directory, so the map's name comes back.  The manifest that ended the
# job drops its id, so the next start deletes it and reports nothing.
# Then a map of a job that ended, with no drop line at all, is also
# deleted at start, and nbdsnap check finds nothing to report about it.

SNAPSHOT_MODE=cbw
source ./functions.sh
set -e
set -x

requires_powerfs
requires nbdsh --version
requires jq --version

origin=$tmp/origin.img
mnt=$tmp/mnt
store=$mnt/store
sock=$tmp/nbd.sock

mount_powerfs $mnt

start ()
{
    start_store -D snapshot.job_hold=1
}

make_origin $origin 8M
start
nbdsnap -c $store create s1
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\xaa" * (1 << 20), 0)
h.flush()
'
nbdsnap -c $store revert s1
id=$(last_job_field id)
wait_held $id 0
test -f $store/revert-$id.map
# One step, then a flush saves its progress: the map holds bits (an
# all-clear map holds nothing, and any start deletes it).
job_release $id 1
wait_held $id 1
nbdsh -u "$(nbd_uri $sock)" -c 'h.flush()'
cp $store/revert-$id.map $tmp/revert.map
job_release $id
nbdsnap -c $store wait
[ "$(last_job_field state)" = done ]
test ! -e $store/revert-$id.map
stop_nbdkit $nbdkit_pid KILL
power_loss

start
test ! -e $store/revert-$id.map || fail "revert-$id.map outlived its job"
if grep "revert-$id.map" $tmp/nbdkit.log | grep -q "left alone"; then
    fail "the start reported revert-$id.map"
fi
stop_nbdkit $nbdkit_pid

# A map of a job that ended (its id is below the manifest's next id),
# with no drop line.
grep -q "^drop $id\$" $store/manifest && fail "drop $id outlived its file"
cp $tmp/revert.map $store/revert-$id.map
check_clean $store
start
test ! -e $store/revert-$id.map || fail "revert-$id.map was not deleted"
stop_nbdkit $nbdkit_pid
check_clean $store

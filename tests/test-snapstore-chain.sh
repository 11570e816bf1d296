#!/usr/bin/env bash
# nbdkit-snapshot
# A backup chain served by the snapstore plugin.  Six snapshots of a
# volume, each after a round of random writes (unaligned, across block
# edges, zeroing, trimming, whole blocks turned all-zero); a full backup
# of the first into a chain directory and an incremental backup of each
# later one.  Every restore point the plugin serves reads as the
# snapshot it was taken from (by checksum); nbdinfo --list describes
# them and the default export is the newest; base:allocation claims of
# zeros hold; dirty/FROM/TO has the filter's map and applies onto a copy
# of FROM.  Then the chain is trimmed offline: consolidate a middle
# point and the full one, discard the newest; the rest still read the
# same, nbdsnap check finds the chain clean at every step, and a backup
# of a restore point served by the plugin starts a second chain.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires nbdinfo --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
chain=$tmp/chain
psock=$tmp/plugin.sock

make_origin $origin 32M
start_store

declare -A want
nbdsnap -c $store create s0
want[s0]=$(export_md5 $sock snap/s0)
nbdsnap backup "$(nbd_uri $sock snap/s0)" --to $chain/ > $tmp/out
cat $tmp/out
grep "restore point 's0' of $chain" $tmp/out
for r in 1 2 3 4 5; do
    random_round $sock $r
    nbdsnap -c $store create s$r
    want[s$r]=$(export_md5 $sock snap/s$r)
    nbdsnap --json backup "$(nbd_uri $sock snap/s$r)" --since s$((r-1)) \
        --to $chain > $tmp/out.json
    jq -e --arg p s$r '.restore_point == $p and .since != null' \
        $tmp/out.json
    nbdinfo --map "$(nbd_uri $sock dirty/s$((r-1))/s$r)" > $tmp/filter-$r.map
done
stop_nbdkit $nbdkit_pid
check_clean $chain

# Each restore point reads as its snapshot.
start_snapstore $psock $chain
for r in 0 1 2 3 4 5; do
    [ "$(export_md5 $psock snap/s$r)" = "${want[s$r]}" ] ||
        fail "restore point s$r does not read as snapshot s$r"
done
# The default export is the newest.
[ "$(export_md5 $psock)" = "${want[s5]}" ] ||
    fail "the default export is not the newest restore point"
nbdinfo --json --list "$(nbd_uri $psock)" > $tmp/list.json
jq -r '.exports[]."export-name"' $tmp/list.json > $tmp/names
cat $tmp/names
for r in 0 1 2 3 4 5; do grep -Fx "snap/s$r" $tmp/names; done
for r in 1 2 3 4 5; do grep -Fx "dirty/s$((r-1))/s$r" $tmp/names; done
jq -e '.exports[] | select(."export-name" == "snap/s3") | .description |
       test("row snapshot taken .* changed since .s2.")' $tmp/list.json

# base:allocation: zeros claimed are zeros; the map of the changes is
# the filter's.
for r in 0 3 5; do zero_claims_hold $psock snap/s$r; done
for r in 1 2 3 4 5; do
    nbdinfo --map "$(nbd_uri $psock dirty/s$((r-1))/s$r)" > $tmp/plugin.map
    diff -u $tmp/filter-$r.map $tmp/plugin.map
done
# dirty/s1/s4, applied onto a copy of s1, gives s4.
save_export $psock snap/s1 $tmp/s1.img
nbdcopy -S 0 --destination-is-zero --request-size=65536 -- \
    "$(nbd_uri $psock dirty/s1/s4)" [ nbdkit --exit-with-parent file $tmp/s1.img ]
[ "$(md5 $tmp/s1.img)" = "${want[s4]}" ] ||
    fail "dirty/s1/s4 applied onto s1 is not s4"

# A restore point served by the plugin backs up into a second chain.
nbdsnap backup "$(nbd_uri $psock snap/s2)" --to $tmp/copy/
nbdsnap backup "$(nbd_uri $psock snap/s4)" --since s2 --to $tmp/copy
stop_nbdkit $nbdkit_pid
check_clean $tmp/copy
start_snapstore $psock $tmp/copy
[ "$(export_md5 $psock snap/s2)" = "${want[s2]}" ] || fail "copy: s2"
[ "$(export_md5 $psock snap/s4)" = "${want[s4]}" ] || fail "copy: s4"
stop_nbdkit $nbdkit_pid

# The listing.
nbdsnap chain $chain
nbdsnap --json chain $chain > $tmp/chain.json
jq -e '[.points[].name] == ["s0","s1","s2","s3","s4","s5"] and
       .origin_retired and .points[0].data_bytes == 32 * 1048576' \
    $tmp/chain.json

# Consolidate s2 (its data merges with s3's), then s0 (the full backup
# merges with s1's changes); discard s5.  The others read the same.
nbdsnap consolidate $chain s2 > $tmp/out
cat $tmp/out
grep "job .*: delete s2 by .*: done" $tmp/out
check_clean $chain
nbdsnap --json consolidate $chain s0 --strategy=stream > $tmp/out.json
jq -e '.job.state == "done" and .job.strategy == "stream"' $tmp/out.json
check_clean $chain
nbdsnap discard $chain s5 > $tmp/out
grep "discarded restore point 's5'" $tmp/out
check_clean $chain
nbdsnap --json chain $chain | jq -e '[.points[].name] == ["s1","s3","s4"]'
start_snapstore $psock $chain
for r in 1 3 4; do
    [ "$(export_md5 $psock snap/s$r)" = "${want[s$r]}" ] ||
        fail "after consolidating: s$r does not read as before"
done
[ "$(export_md5 $psock)" = "${want[s4]}" ] ||
    fail "after discarding s5, the default export is not s4"
stop_nbdkit $nbdkit_pid

# The chain grows again from its newest point.
start_store
nbdsnap backup "$(nbd_uri $sock snap/s5)" --since s4 --to $chain
stop_nbdkit $nbdkit_pid
check_clean $chain
start_snapstore $psock $chain
[ "$(export_md5 $psock snap/s5)" = "${want[s5]}" ] ||
    fail "s5 backed up again does not read as s5"

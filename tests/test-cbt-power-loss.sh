#!/usr/bin/env bash
# nbdkit-snapshot
# Write-intent regions (filters/snapshot/intent.c): writes in place
# under a bitmap-only checkpoint write their fine dirty bits without a
# sync and sync only a coarse intent bit per 64 MiB region.  Checks:
#   1. power loss, simulated: kill -9, then the fine map loses every
#      page written since its last sync (the file is cut back to its
#      header) and the store's boot-id is made to look like another
#      boot.  At restart every block of the regions written is marked,
#      and no block of the regions left alone.
#   2. kill -9 in the same boot: the fine map is used as it is, so
#      only the blocks written are marked (no region expanded).
#   3. a client flush clears the intent file, so a later "power loss"
#      marks nothing more than the blocks written.
# In cbw mode the checkpoints are snapshots: there too the writes land
# in place (on the origin, after their old contents are kept in the
# newest layer), with nothing else to record the blocks they change.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdinfo --version
requires python3 --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
bs=65536
region=$((64 * 1024 * 1024))

start ()
{
    start_store -D snapshot.intent_clear_ms=0
}

# The kind of checkpoint (nbdsnap create options): see above.
if is_cbw; then ckpt=(); else ckpt=(--bitmap-only); fi

# write_blocks B...: write 4 KiB of fresh data into each block B (no
# flush).
write_blocks ()
{
    nbdsh -u "$(nbd_uri $sock)" -c "
import os, sys
for b in [$(IFS=,; echo "$*")]:
    h.pwrite(os.urandom(4096), b * $bs + 512)
"
}

# marked CHECKPOINT: the marked blocks of dirty/CHECKPOINT, one a line.
marked ()
{
    nbdinfo --map --json "$(nbd_uri $sock dirty/$1)" |
        python3 -c "
import json, sys
for e in json.load(sys.stdin):
    if e['type'] == 0:
        for b in range(e['offset'] // $bs, (e['offset'] + e['length']) // $bs):
            print(b)
"
}

# intent_bits: how many regions intent.map has set.
intent_bits ()
{
    python3 -c "
data = open('$store/intent.map', 'rb').read()[4096:]
print(sum(bin(c).count('1') for c in data))
"
}

# The map file of checkpoint NAME (from the manifest).
map_of ()
{
    local id
    id=$(sed -n "s/^checkpoint $1 .* map=\([0-9]*\).*/\1/p" $store/manifest)
    test -n "$id"
    echo $store/dirty-$id.map
}

# 256 MiB: four intent regions of 64 MiB (1024 blocks each).
make_origin $origin 256M
start
test "$(intent_bits)" -eq 0

# ---- 1. simulated power loss ----
nbdsnap -c $store create c1 "${ckpt[@]}"
# Blocks in regions 0 and 2 only.
write_blocks 3 500 1023 2048 2100 3071
test "$(intent_bits)" -eq 2
stop_nbdkit $nbdkit_pid KILL
map=$(map_of c1)
# What an unsynced page cache loses: every page since the last sync
# (the map was empty when c1 was taken).
truncate -s 4096 $map
truncate -s $((4096 + 4096)) $map
echo 00000000-0000-0000-0000-000000000000 > $store/boot-id
start
marked c1 > $tmp/m1
# Regions 0 and 2 whole (blocks 0-1023, 2048-3071), nothing else.
python3 - $tmp/m1 <<'EOF'
import sys
got = {int(x) for x in open(sys.argv[1])}
want = set(range(0, 1024)) | set(range(2048, 3072))
assert got == want, "marked %d blocks, expected regions 0 and 2: extra %s, missing %s" % (
    len(got), sorted(got - want)[:5], sorted(want - got)[:5])
print("power loss: regions 0 and 2 marked whole, 1 and 3 untouched")
EOF
# Recovery made it durable and emptied the intent file.
test "$(intent_bits)" -eq 0

# ---- 2. kill -9 in the same boot: exact ----
nbdsnap -c $store create c2 "${ckpt[@]}"
write_blocks 1030 1500 2000
stop_nbdkit $nbdkit_pid KILL
start
marked c2 > $tmp/m2
printf '%s\n' 1030 1500 2000 | cmp - $tmp/m2

# ---- 3. a flush clears the intent regions ----
nbdsnap -c $store create c3 "${ckpt[@]}"
write_blocks 3100 3500
test "$(intent_bits)" -eq 1
nbdsh -u "$(nbd_uri $sock)" -c 'h.flush()'
test "$(intent_bits)" -eq 0
stop_nbdkit $nbdkit_pid KILL
echo 00000000-0000-0000-0000-000000000001 > $store/boot-id
start
marked c3 > $tmp/m3
printf '%s\n' 3100 3500 | cmp - $tmp/m3
# c2 still covers c2 and c3's writes, nothing expanded.
marked c2 > $tmp/m2b
printf '%s\n' 1030 1500 2000 3100 3500 | cmp - $tmp/m2b

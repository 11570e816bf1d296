#!/usr/bin/env bash
# nbdkit-snapshot
# base:allocation of dirty/ exports is the changed-block bitmap:
# nbdinfo --map and qemu-img map report exactly the blocks written
# (changed = data, unchanged = hole,zero), and the contents read as
# the live volume or snapshot in changed blocks and zeros elsewhere.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdinfo --version
requires qemu-img --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
bs=65536

make_origin $origin 16M
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store

# No snapshot yet: a bitmap-only checkpoint, writes to the origin.
nbdsnap -c $store create c1 --bitmap-only
nbdsh -u "$(nbd_uri $sock)" -c "
h.pwrite(b'x' * 10, $bs * 3 + 5)          # block 3
h.pwrite(b'y' * ($bs + 2), $bs * 6 - 1)   # blocks 5, 6, 7
h.zero(100, $bs * 20)                     # block 20
h.trim($bs, $bs * 30)                     # block 30
"
nbdsnap -c $store create s1
nbdsh -u "$(nbd_uri $sock)" -c "
h.pwrite(b'z' * 4096, $bs * 40)           # block 40
"

# Changed since c1, as offset/length of data extents.
map_data ()
{
    nbdinfo --map --json "$(nbd_uri $sock "$1")" |
        jq -c '[.[] | select(.type == 0) | [.offset, .length]]'
}
[ "$(map_data dirty/c1)" = \
  "[[$((bs*3)),$bs],[$((bs*5)),$((bs*3))],[$((bs*20)),$bs],[$((bs*30)),$bs],[$((bs*40)),$bs]]" ] ||
    fail "dirty/c1 map: $(map_data dirty/c1)"
[ "$(map_data dirty/c1/s1)" = \
  "[[$((bs*3)),$bs],[$((bs*5)),$((bs*3))],[$((bs*20)),$bs],[$((bs*30)),$bs]]" ] ||
    fail "dirty/c1/s1 map: $(map_data dirty/c1/s1)"
[ "$(map_data dirty/s1)" = "[[$((bs*40)),$bs]]" ] ||
    fail "dirty/s1 map: $(map_data dirty/s1)"

# Unchanged ranges are hole,zero (type 3).
nbdinfo --map --json "$(nbd_uri $sock dirty/s1)" |
    jq -e '[.[] | select(.type != 0) | .type] | all(. == 3)'

# qemu-img map agrees (data: true only for changed blocks).
qemu-img map --output=json -f raw "$(nbd_uri $sock dirty/c1/s1)" |
    jq -c '[.[] | select(.data) | [.start, .length]]' > $tmp/qmap
[ "$(cat $tmp/qmap)" = \
  "[[$((bs*3)),$bs],[$((bs*5)),$((bs*3))],[$((bs*20)),$bs],[$((bs*30)),$bs]]" ] ||
    fail "qemu-img map of dirty/c1/s1: $(cat $tmp/qmap)"

# Contents: changed blocks as in snap/s1, the rest zeros.
save_export $sock snap/s1 $tmp/s1.img
save_export $sock dirty/c1/s1 $tmp/d.img
python3 - $tmp/s1.img $tmp/d.img $bs <<'EOF'
import sys
s1 = open(sys.argv[1], "rb").read()
d = open(sys.argv[2], "rb").read()
bs = int(sys.argv[3])
changed = {3, 5, 6, 7, 20, 30}
for b in range(len(s1) // bs):
    want = s1[b*bs:(b+1)*bs] if b in changed else bytes(bs)
    assert d[b*bs:(b+1)*bs] == want, "block %d" % b
print("dirty/c1/s1 contents OK")
EOF

# nbdinfo --list shows each dirty/ export with its changed bytes.
nbdinfo --list --json "$(nbd_uri $sock)" > $tmp/list.json
jq -e '.exports[] | select(."export-name" == "dirty/c1") |
       .description | test("7 blocks \\(448.0 KiB\\)")' $tmp/list.json
jq -e '.exports[] | select(."export-name" == "dirty/s1") |
       .description | test("1 block \\(64.0 KiB\\)")' $tmp/list.json

# nbdsnap agrees.
nbdsnap -c $store --json info c1 > $tmp/c1.json
jq -e '.checkpoint.kind == "bitmap" and .checkpoint.changed_blocks == 7 and
       .checkpoint.export == null and
       .checkpoint.dirty_export == "dirty/c1"' $tmp/c1.json

# Block status on a huge sparse volume is quick: 1 TiB, 1000 blocks.
stop_nbdkit $nbdkit_pid
truncate -s 1T $tmp/big.img
start_nbdkit -P $tmp/big.pid -U $tmp/big.sock \
             --filter=$FILTER file $tmp/big.img snapshot-store=$tmp/bigstore
nbdsnap -c $tmp/bigstore create c --bitmap-only
nbdsh -u "$(nbd_uri $tmp/big.sock)" -c '
import random
rng = random.Random(1)
size = h.get_size()
for i in range(1000):
    h.pwrite(b"q", rng.randrange(0, size // 65536) * 65536)
'
n=$(nbdinfo --map --json "$(nbd_uri $tmp/big.sock dirty/c)" |
    jq '[.[] | select(.type == 0) | .length] | add / 65536')
[ "$n" -eq 1000 ] || fail "1 TiB volume: $n changed blocks, expected 1000"

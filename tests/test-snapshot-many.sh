#!/usr/bin/env bash
# nbdkit-snapshot
# Fifty snapshots, each taken after writing its own pattern to a few
# blocks.  A model of the volume, kept as the writes are made, gives
# each snapshot's checksum and its changed_blocks and layer_bytes;
# afterwards every snap/NAME and the live volume must match.

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
n=50

make_origin $origin 4M
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store

# Write, snapshot, repeat.  The model records, per snapshot, the
# checksum of the volume, and afterwards the blocks written since
# (changed_blocks) and bounds on what its layer holds (layer_bytes).
export NBDSNAP origin store n
nbdsh -u "$(nbd_uri $sock)" -c '
import hashlib, os, subprocess
bs = 65536
n = int(os.environ["n"])
size = h.get_size()
nblocks = size // bs
with open(os.environ["origin"], "rb") as f:
    model = bytearray(f.read())
assert len(model) == size
last_write = [0] * nblocks      # phase of the last write to each block
in_phase = [set() for i in range(n + 2)]   # blocks written in each phase
full_in_phase = [set() for i in range(n + 2)]  # ... and written whole

def write(buf, off, phase):
    h.pwrite(buf, off)
    model[off:off + len(buf)] = buf
    for b in range(off // bs, (off + len(buf) - 1) // bs + 1):
        last_write[b] = phase
        in_phase[phase].add(b)
        if off <= b * bs and (b + 1) * bs <= off + len(buf):
            full_in_phase[phase].add(b)

sums = []
for i in range(1, n + 1):
    # Phase i: the writes before snapshot i.
    for k in (7, 13, 29):
        b = (i * k) % nblocks
        write(bytes([i]) * bs, b * bs, i)
    write(bytes([0x80 + i]) * 1000, (i * 31 % nblocks) * bs + 4000, i)
    name = "s%02d" % i
    subprocess.run([os.environ["NBDSNAP"], "-c", os.environ["store"],
                    "create", name], check=True)
    sums.append((name, hashlib.md5(model).hexdigest()))

# Phase n+1: after the last snapshot.
write(b"\xff" * 3 * bs, 5 * bs, n + 1)
h.flush()

with open("'$tmp'/expected", "w") as f:
    for i, (name, s) in enumerate(sums, start=1):
        changed = sum(1 for p in last_write if p > i)
        # How finely a layer holds data is not specified: somewhere
        # from the whole blocks written to every block touched.
        low = len(full_in_phase[i + 1]) * bs
        high = len(in_phase[i + 1]) * bs
        f.write("%s %s %d %d %d\n" % (name, s, changed, low, high))
with open("'$tmp'/live.md5", "w") as f:
    f.write(hashlib.md5(model).hexdigest() + "\n")
'

# Every snapshot reads as it was taken.
nbdsnap -c $store --json list > $tmp/list.json
jq -e --argjson n $n '.checkpoints | length == $n' $tmp/list.json
i=0
while read name sum changed low high; do
    [ "$(export_md5 $sock snap/$name)" = "$sum" ] ||
        fail "snap/$name does not read as it was taken"
    # Oldest first.
    jq -e --argjson i $i --arg name $name --argjson changed $changed \
       --argjson low $low --argjson high $high '.checkpoints[$i] |
         .name == $name and .export == "snap/\($name)" and
         .changed_blocks == $changed and .changed_bytes == $changed * 65536 and
         .layer_bytes >= $low and .layer_bytes <= $high' $tmp/list.json
    i=$((i + 1))
done < $tmp/expected
[ $i -eq $n ]
[ "$(export_md5 $sock)" = "$(cat $tmp/live.md5)" ]

# nbdinfo --list shows all of them.
nbdinfo --list --json "$(nbd_uri $sock)" > $tmp/exports.json
jq -e --argjson n $n '[.exports[] | .["export-name"] |
  select(startswith("snap/"))] | length == $n' $tmp/exports.json
jq -e --arg m $snapshot_mode '.exports[] | select(.["export-name"] == "") |
  .description | test("^live volume \\(\($m), 50 snapshots(, [^()]*)?\\)$")' \
   $tmp/exports.json
jq -e --arg m $snapshot_mode '[.exports[] |
  select(.["export-name"] | startswith("snap/")) |
  .description | test("^\($m) snapshot taken ")] | all' $tmp/exports.json

# The origin is the volume as it was at the first snapshot (row), or
# as it is now (cbw).
save_export $sock snap/s01 $tmp/s01.img
save_export $sock "" $tmp/live.img
check_origin $tmp/s01.img $tmp/live.img

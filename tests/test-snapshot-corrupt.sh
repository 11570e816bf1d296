#!/usr/bin/env bash
# nbdkit-snapshot
# Damage to a stopped store is found at start-up, not served as data:
# a flipped byte in a layer's map, a map cut down to its header, a
# zeroed page of a dirty map, a hole punched into a layer's data.  Each
# is refused with an error naming the file, and the undamaged store
# still starts and reads as before.  Holes the filter made itself
# (zero, trim) and a kill -9 are not taken for damage.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires fallocate --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
make_origin $origin 16M

# Snapshot s1, bitmap-only b1, snapshot s2, with writes, zeroes (row:
# the newest layer punches holes for them) and a trim between them.
start_store
nbdsnap -c $store create s1
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\x11" * 300000, 100000)
h.zero(1 << 20, 4 << 20)
h.flush()
'
nbdsnap -c $store create b1 --bitmap-only
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\x22" * 70000, 2 << 20)
h.flush()
'
nbdsnap -c $store create s2
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\x33" * 200000, 6 << 20)
h.pwrite(bytes(65536 + 3000), (7 << 20) - 1000)
h.zero(65536, 6 << 20)
h.trim(65536, (6 << 20) + 65536)
h.flush()
'
save_export $sock snap/s1 $tmp/s1.img
save_export $sock snap/s2 $tmp/s2.img
save_export $sock "" $tmp/live.img
stop_nbdkit $nbdkit_pid

# copy_store FROM TO: a copy of a stopped store as a user would make
# one: cp -a --sparse=always makes holes of every run of zeros.  A
# layer never holds a page of zeros as data, so the copy matches the
# seals (which record where a layer's data has holes).
copy_store ()
{
    cp -a --sparse=always "$1" "$2"
}
copy_store $store $tmp/good

# The layers: s1 started the older one, s2 the newest.
l1=$(ls $store | sed -n 's/^layer-\([0-9]*\)\.data$/\1/p' |
     sort -n | head -1)
l2=$(ls $store | sed -n 's/^layer-\([0-9]*\)\.data$/\1/p' | sort -n |
     tail -1)
[ "$l1" != "$l2" ] || fail "expected two layers"
dirty=$(ls $store | sed -n 's/^\(dirty-[0-9]*\.map\)$/\1/p' | head -1)

# first_set_byte FILE: the offset of the first byte of map FILE's
# bitmap pages that holds a set bit.
first_set_byte ()
{
    python3 - "$1" <<'EOF'
import sys
with open(sys.argv[1], "rb") as f:
    data = f.read()
for off in range(4096, len(data)):
    if data[off]:
        print(off)
        break
else:
    sys.exit("no set bit in " + sys.argv[1])
EOF
}

# poke FILE OFFSET BYTE: write BYTE (0 to 255) at OFFSET of FILE.
poke ()
{
    python3 -c "
import sys
with open(sys.argv[1], 'r+b') as f:
    f.seek(int(sys.argv[2])); f.write(bytes([int(sys.argv[3])]))
" "$@"
}

# refused WANT: starting on the damaged store fails, saying WANT; then
# the store is put back as it was.
refused ()
{
    start_fails "$1" $origin snapshot-store=$store
    rm -rf $store
    copy_store $tmp/good $store
}

# 1. A flipped bit in the body of a frozen layer's map (a bit set next
#    to the first byte's set bits).
off=$(first_set_byte $store/layer-$l1.map)
byte=$(od -An -tu1 -j $off -N1 $store/layer-$l1.map)
poke $store/layer-$l1.map $off $(( byte == 255 ? 127 : byte | (byte + 1) ))
refused "layer-$l1.map: the bitmap does not match its seal"

# 2. The newest layer's map, sealed at the clean stop: a byte of set
#    bits cleared.
off=$(first_set_byte $store/layer-$l2.map)
poke $store/layer-$l2.map $off 0
refused "layer-$l2.map: the bitmap does not match its seal"

# 3. A map cut down to its header.
truncate -s 4096 $store/layer-$l1.map
refused "layer-$l1.map: file is truncated"

# 4. A zeroed page of a dirty map.
off=$(first_set_byte $store/$dirty)
dd if=/dev/zero of=$store/$dirty bs=4096 seek=$(( off / 4096 )) count=1 \
   conv=notrunc
refused "$dirty: the bitmap does not match its seal"

# 5. A hole punched into a layer's data where it held data (100000 is
#    in the first page s1's layer took).
fallocate -p -o 98304 -l 4096 $store/layer-$l1.data
refused "layer-$l1.data: "

# The undamaged store starts, and every view reads as before.
start_store
verify_views $sock $tmp/live.img s1 s2

# 6. After kill -9 the maps in use are not sealed: they are not taken
#    for damage, and the next clean stop seals them again.
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\x44" * 4096, 9 << 20)
h.zero(8192, 10 << 20)
h.flush()
'
save_export $sock "" $tmp/live.img
stop_nbdkit $nbdkit_pid KILL
start_store
verify_views $sock $tmp/live.img s1 s2
stop_nbdkit $nbdkit_pid
start_store
verify_views $sock $tmp/live.img s1 s2
stop_nbdkit $nbdkit_pid

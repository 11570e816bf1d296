#!/usr/bin/env bash
# nbdkit-snapshot
# base:allocation for every view.  The origin has holes and data;
# layers add data, zeroed blocks and trimmed blocks.  qemu-img map
# and nbdinfo --map must show the expected data/hole/zero state at
# chosen offsets of the live volume and of each snapshot, and in
# every view a range reported as zero must read as zeroes.

source ./functions.sh
set -e
set -x

requires qemu-img --version
requires nbdinfo --version
requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
live=$(nbd_uri $sock)
M=$((1024 * 1024))
K=1024

# Origin (16M): data in [1M, 1M+128K) and [4M, 4M+64K), holes
# elsewhere.
truncate -s 16M $origin
dd if=/dev/urandom of=$origin bs=64K seek=16 count=2 conv=notrunc
dd if=/dev/urandom of=$origin bs=64K seek=64 count=1 conv=notrunc

start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store

# get_maps EXPORT: save the map of EXPORT as nbdinfo and as qemu-img
# see it, for expect below.
map_file ()
{
    echo "$tmp/map-$(echo "$2" | tr / _).$1.json"
}

get_maps ()
{
    nbdinfo --map --json "$(nbd_uri $sock "$1")" > "$(map_file nbdinfo "$1")"
    qemu-img map -f raw --output=json "$(nbd_uri $sock "$1")" \
             > "$(map_file qemu "$1")"
}

# nbdinfo_type EXPORT OFFSET: the base:allocation type at OFFSET.
nbdinfo_type ()
{
    jq -e --argjson o "$2" \
       '.[] | select(.offset <= $o and $o < .offset + .length) | .type' \
       "$(map_file nbdinfo "$1")"
}

# qemu_state EXPORT OFFSET: "data zero" as qemu-img map reports them
# at OFFSET, e.g. "false true" for a hole.
qemu_state ()
{
    jq -e -r --argjson o "$2" \
       '.[] | select(.start <= $o and $o < .start + .length) |
        "\(.data) \(.zero)"' "$(map_file qemu "$1")"
}

# expect EXPORT OFFSET WHAT, WHAT being
#   data   allocated (type 0; qemu: data true, zero false)
#   hole   hole reading as zeroes (type 3; qemu: data false, zero true)
#   zero   reads as zeroes, allocated or not (type 2 or 3; qemu: zero)
expect ()
{
    local t q
    t=$(nbdinfo_type "$1" "$2")
    q=$(qemu_state "$1" "$2")
    case "$3" in
        data) [ "$t" = 0 ] && [ "$q" = "true false" ] ;;
        hole) [ "$t" = 3 ] && [ "$q" = "false true" ] ;;
        zero) { [ "$t" = 2 ] || [ "$t" = 3 ]; } &&
              { [ "$q" = "true true" ] || [ "$q" = "false true" ]; } ;;
        *) fail "expect: bad state $3" ;;
    esac || fail "export '$1' offset $2: expected $3, got type $t, qemu $q"
}

# sound EXPORT: the extents tile the export, and every extent
# flagged zero reads as zeroes.
sound ()
{
    nbdsh --base-allocation -u "$(nbd_uri $sock "$1")" -c '
size = h.get_size()
extents = []
def f(meta, off, entries, err):
    assert meta == "base:allocation"
    for i in range(0, len(entries), 2):
        extents.append((entries[i], entries[i + 1]))
off = 0
while off < size:
    n = len(extents)
    h.block_status(min(size - off, 1 << 30), off, f)
    assert len(extents) > n
    for length, flags in extents[n:]:
        assert length > 0
        length = min(length, size - off)
        if flags & 2:
            for o in range(off, off + length, 1 << 24):
                n = min(1 << 24, off + length - o)
                assert h.pread(n, o) == bytes(n), \
                    "extent at %d flagged zero does not read as zeroes" % o
        off += length
assert off == size
'
}

# The live volume is the origin as it is.
get_maps ""
expect "" 0 hole
expect "" $((1 * M)) data
expect "" $((1 * M + 64 * K)) data
expect "" $((1 * M + 128 * K)) hole
expect "" $((4 * M)) data
expect "" $((8 * M)) hole
expect "" $((16 * M - 1)) hole
sound ""

# s0 freezes the origin (row; in cbw mode s0's layer keeps what the
# writes below overwrite in it); the same layout.
nbdsnap -c $store create s0
save_export $sock snap/s0 $tmp/s0.img
cmp $tmp/s0.img $origin

# Layer 1: data at 8M and 10M (4K of a 64K block), zeroes over origin
# data at 1M and over a hole at 12M, trim over origin data at 4M.
nbdsh -u "$live" -c '
h.pwrite(b"\x81" * 65536, 8 * 1024 * 1024)
h.pwrite(b"\x82" * 4096, 10 * 1024 * 1024)
h.zero(65536, 1 * 1024 * 1024)
h.zero(65536, 12 * 1024 * 1024)
h.trim(65536, 4 * 1024 * 1024)
'
nbdsnap -c $store create s1
save_export $sock snap/s1 $tmp/s1.img

# Layer 2: data over the block zeroed in layer 1, zeroes over the
# data block of layer 1.
nbdsh -u "$live" -c '
h.pwrite(b"\x83" * 65536, 12 * 1024 * 1024)
h.zero(65536, 8 * 1024 * 1024)
'

for e in "" snap/s0 snap/s1; do
    get_maps "$e"
done

# snap/s0 is the origin as it was.
expect snap/s0 0 hole
expect snap/s0 $((1 * M)) data
expect snap/s0 $((1 * M + 64 * K)) data
expect snap/s0 $((4 * M)) data
expect snap/s0 $((8 * M)) hole
expect snap/s0 $((10 * M)) hole
expect snap/s0 $((12 * M)) hole
expect snap/s0 $((16 * M - 1)) hole

# snap/s1 is the origin with the writes of layer 1.
expect snap/s1 0 hole
expect snap/s1 $((1 * M)) zero
expect snap/s1 $((1 * M + 64 * K)) data
expect snap/s1 $((8 * M)) data
expect snap/s1 $((10 * M)) data
expect snap/s1 $((12 * M)) zero
expect snap/s1 $((14 * M)) hole
expect snap/s1 $((16 * M - 1)) hole

# The live volume has the writes of layer 2 on top.
expect "" 0 hole
expect "" $((1 * M)) zero
expect "" $((1 * M + 64 * K)) data
expect "" $((8 * M)) zero
expect "" $((10 * M)) data
expect "" $((12 * M)) data
expect "" $((14 * M)) hole
expect "" $((16 * M - 1)) hole

for e in "" snap/s0 snap/s1; do
    sound "$e"
done

# The data itself: snapshots as saved, the live volume as written.
[ "$(export_md5 $sock snap/s0)" = "$(md5 $tmp/s0.img)" ]
[ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1.img)" ]
save_export $sock "" $tmp/live.img
nbdsh -u "$live" -c '
assert h.pread(65536, 8 * 1024 * 1024) == bytes(65536)
assert h.pread(65536, 12 * 1024 * 1024) == b"\x83" * 65536
assert h.pread(4096, 10 * 1024 * 1024) == b"\x82" * 4096
assert h.pread(61440, 10 * 1024 * 1024 + 4096) == bytes(61440)
assert h.pread(65536, 1 * 1024 * 1024) == bytes(65536)
'
cmp -n $((64 * K)) -i $((1 * M + 64 * K)) $tmp/live.img $origin
nbdsh -u "$(nbd_uri $sock snap/s1)" -c '
assert h.pread(65536, 8 * 1024 * 1024) == b"\x81" * 65536
assert h.pread(65536, 12 * 1024 * 1024) == bytes(65536)
'

# The origin was frozen by s0 (row), or holds the live volume (cbw).
check_origin $tmp/s0.img $tmp/live.img

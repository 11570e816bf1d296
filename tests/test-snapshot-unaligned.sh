#!/usr/bin/env bash
# nbdkit-snapshot
# Requests that do not line up with snapshot blocks: odd sizes at
# block edges, 512-byte writes, writes across page and block edges,
# unaligned zero and trim, and many small writes to one block in
# flight at once.  Each is applied to a reference file as well, and
# the whole image is compared, before the first snapshot (writes go
# to the origin), after it, and after a second one (partial blocks
# over blocks held by an older layer), with block sizes 4K and 64K.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

# The requests of one phase; PHASE makes the bytes differ each time.
ops='
bs = int(os.environ["BS"])
phase = int(os.environ["PHASE"])
size = h.get_size()
def P(n):
    return 0x10 * phase + n

w(pat(P(1), 3), bs - 1)
w(pat(P(2), bs * 2), 1)
for i in range(8):
    w(pat(P(3), 512), bs * 4 + 1024 * i)
w(pat(P(4), 8192), bs * 7 - 4096)
w(pat(P(5), 4097), 4096 * 3 - 1)
w(pat(P(6), 1), size - 1)
w(pat(P(7), bs + 1), size - bs - 2)
z(3, bs * 9 - 1)
z(bs * 2 + 100, bs * 10 + 50)
z(bs, bs * 13)
z(1000, bs * 14 + 10, nbd.CMD_FLAG_NO_HOLE)
t(bs * 2 + 200, bs * 15 + 100)
t(bs, bs * 18)
w(pat(P(8), 100), bs * 15 + 150)
w(pat(P(9), 700), bs * 20 + 1000, nbd.CMD_FLAG_FUA)
aw([(pat(P(10) + i, 512), bs * 22 + 1024 * i) for i in range(32)])
aw([(pat(P(11), 100), bs * 24 + 4096 * i + 7) for i in range(16)])
w(pat(P(12), bs * 3 + 777), bs * (26 + phase) + 333)
h.flush()
check(0, size)
'

for bs in 4K 64K; do
    case $bs in 4K) BS=4096 ;; 64K) BS=65536 ;; esac
    export BS

    origin=$tmp/origin-$bs.img
    store=$tmp/store-$bs
    sock=$tmp/nbd-$bs.sock
    REF=$tmp/ref-$bs.img
    export REF

    make_origin $origin 4M
    cp $origin $REF
    start_nbdkit -P $tmp/nbdkit-$bs.pid -U $sock \
                 --filter=$FILTER file $origin \
                 snapshot-store=$store snapshot-block-size=$bs
    pid=$nbdkit_pid

    nbdsnap -c $store --json list > $tmp/list.json
    jq -e --argjson bs $BS '.block_size == $bs' $tmp/list.json

    # Before any snapshot: the requests reach the origin.
    PHASE=1 nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c "$ops"
    [ "$(export_md5 $sock)" = "$(md5 $REF)" ]
    cmp $origin $REF

    nbdsnap -c $store create s1
    cp $REF $tmp/s1-$bs.img

    # On a fresh layer over the origin.
    PHASE=2 nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c "$ops"
    [ "$(export_md5 $sock)" = "$(md5 $REF)" ]
    [ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1-$bs.img)" ]

    nbdsnap -c $store create s2
    cp $REF $tmp/s2-$bs.img

    # On a layer over a layer over the origin.
    PHASE=3 nbdsh -u "$(nbd_uri $sock)" -c "$ref_ops" -c "$ops"
    [ "$(export_md5 $sock)" = "$(md5 $REF)" ]
    [ "$(export_md5 $sock snap/s1)" = "$(md5 $tmp/s1-$bs.img)" ]
    [ "$(export_md5 $sock snap/s2)" = "$(md5 $tmp/s2-$bs.img)" ]

    # The origin was frozen by s1 (row), or holds the live volume
    # (cbw: the requests went to it in place).
    check_origin $tmp/s1-$bs.img $REF

    stop_nbdkit $pid
done

#!/usr/bin/env bash
# nbdkit-snapshot
# Incremental backups are always correct.  A full backup of a
# snapshot, then five rounds of random writes (unaligned across block
# edges, zeroing, trimming, and writes that turn a block into all
# zeros), each ending in a new snapshot and an incremental backup of
# the changes since the previous one: with nbdsnap backup, and with
# the stock-tools recipe (nbdcopy -S 0 --destination-is-zero onto an
# NBD destination).  After each round both backups equal the snapshot.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
bk=$tmp/backup.img
bk2=$tmp/backup-nbdcopy.img

make_origin $origin 24M
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store \
             snapshot-block-size=16K

nbdsnap -c $store create s0
nbdsnap backup "$(nbd_uri $sock snap/s0)" --to $bk > $tmp/out
cat $tmp/out
grep '^copied ' $tmp/out
[ "$(md5 $bk)" = "$(export_md5 $sock snap/s0)" ] ||
    fail "full backup differs from snap/s0"
cp $bk $bk2

for r in 1 2 3 4 5; do
    # Random operations, seeded by the round so failures reproduce.
    nbdsh -u "$(nbd_uri $sock)" -c "
import random
rng = random.Random($r)
size = h.get_size()
bs = 16384
for i in range(60):
    op = rng.choice(['w', 'w', 'w', 'edge', 'zero', 'trim', 'zdata'])
    if op == 'w':
        n = rng.randint(1, 100000)
        off = rng.randrange(0, size - n)
        h.pwrite(rng.randbytes(n), off)
    elif op == 'edge':
        # Across a block edge, unaligned on both sides.
        b = rng.randrange(1, size // bs)
        n = rng.randint(2, 9000)
        h.pwrite(rng.randbytes(n), b * bs - rng.randint(1, n - 1))
    elif op == 'zero':
        n = rng.randint(1, 200000)
        h.zero(n, rng.randrange(0, size - n))
    elif op == 'trim':
        n = rng.randint(4096, 300000)
        h.trim(n, rng.randrange(0, size - n))
    else:
        # Data that makes a whole block all zeros (sent as a write).
        b = rng.randrange(0, size // bs)
        h.pwrite(bytes(bs), b * bs)
h.flush()
"
    nbdsnap -c $store create s$r
    want=$(export_md5 $sock snap/s$r)

    nbdsnap backup "$(nbd_uri $sock snap/s$r)" --since s$((r-1)) --to $bk \
        > $tmp/out
    cat $tmp/out
    grep "since s$((r-1))" $tmp/out
    [ "$(md5 $bk)" = "$want" ] ||
        fail "round $r: nbdsnap backup differs from snap/s$r"

    nbdcopy -S 0 --destination-is-zero --request-size=16384 -- \
        "$(nbd_uri $sock dirty/s$((r-1))/s$r)" \
        [ nbdkit --exit-with-parent file $bk2 ]
    [ "$(md5 $bk2)" = "$want" ] ||
        fail "round $r: the nbdcopy recipe differs from snap/s$r"
done

# The incremental copied only changed blocks: the last round's report
# is far below the volume size.
bytes=$(nbdsnap backup "$(nbd_uri $sock snap/s5)" --since s4 --to $bk \
            --json | jq .bytes_copied)
[ "$bytes" -gt 0 ] && [ "$bytes" -lt $((24 * 1024 * 1024 / 2)) ] ||
    fail "incremental copied $bytes bytes"

# A bitmap-only checkpoint tracks the live volume the same way.
nbdsnap -c $store create b1 --bitmap-only
nbdsh -u "$(nbd_uri $sock)" -c '
h.pwrite(b"\xaa" * 5000, 16384 * 7 - 100)
h.zero(16384, 16384 * 100)
h.flush()
'
nbdsnap -c $store create s6
nbdcopy -S 0 --destination-is-zero --request-size=16384 -- "$(nbd_uri $sock dirty/b1/s6)" \
    [ nbdkit --exit-with-parent file $bk2 ]
[ "$(md5 $bk2)" = "$(export_md5 $sock snap/s6)" ] ||
    fail "backup through bitmap-only checkpoint b1 differs from snap/s6"

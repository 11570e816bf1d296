#!/usr/bin/env bash
# nbdkit-snapshot
# A base over NBD.  A full backup into a plain FILE, as nbdsnap always
# made them, then a chain of incremental backups started over it with
# --base FILE: the chain's oldest restore point is FILE itself, its
# base.  The plugin serves the chain over FILE (the path the chain
# records), then over the same base converted to qcow2 and served by
# qemu-nbd (base=nbd+unix://...): every restore point reads as the
# snapshot it was taken from.  A base over NBD with other contents is
# refused (its sampled pages differ).

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires qemu-img --version
requires qemu-nbd --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
chain=$tmp/chain
base=$tmp/full.img
psock=$tmp/plugin.sock
qsock=$tmp/qemu.sock

make_origin $origin 24M
start_store
declare -A want
nbdsnap -c $store create mon
want[mon]=$(export_md5 $sock snap/mon)
nbdsnap backup "$(nbd_uri $sock snap/mon)" --to $base
seed=0
for d in tue wed thu; do
    random_round $sock $((++seed))
    nbdsnap -c $store create $d
    want[$d]=$(export_md5 $sock snap/$d)
done
nbdsnap backup "$(nbd_uri $sock snap/tue)" --since mon --to $chain \
    --base $base 2>&1 | grep "restore point 'tue'" ||
    fail "no restore point tue"
nbdsnap backup "$(nbd_uri $sock snap/wed)" --since tue --to $chain
nbdsnap backup "$(nbd_uri $sock snap/thu)" --since wed --to $chain
stop_nbdkit $nbdkit_pid

grep "^origin-path $base\$" $chain/manifest
! grep '^origin retired' $chain/manifest
check_clean $chain
nbdsnap --json chain $chain |
    jq -e --arg b $base '.origin == $b and ([.points[].name] ==
                         ["mon","tue","wed","thu"])'

# Over FILE, the chain's recorded base.
start_snapstore $psock $chain
for d in mon tue wed thu; do
    [ "$(export_md5 $psock snap/$d)" = "${want[$d]}" ] ||
        fail "over FILE: snap/$d does not read as snapshot $d"
done
zero_claims_hold $psock snap/wed
stop_nbdkit $nbdkit_pid

# Over NBD: the same base as qcow2 from qemu-nbd.
qemu-img convert -f raw -O qcow2 $base $tmp/full.qcow2
qemu-nbd -t -k $qsock -f qcow2 --shared=0 $tmp/full.qcow2 \
    2>> $tmp/qemu-nbd.log &
qemu_pid=$!
cleanup_fn kill $qemu_pid
wait_for test -S $qsock
start_snapstore $psock $chain base="$(nbd_uri $qsock)"
for d in mon tue wed thu; do
    [ "$(export_md5 $psock snap/$d)" = "${want[$d]}" ] ||
        fail "over qemu-nbd: snap/$d does not read as snapshot $d"
done
zero_claims_hold $psock snap/mon
zero_claims_hold $psock snap/thu
stop_nbdkit $nbdkit_pid

# A base of the right size and other contents: the samples differ.
cp $base $tmp/other.img
dd if=/dev/urandom of=$tmp/other.img bs=4096 count=1 conv=notrunc
start_nbdkit -P $tmp/other.pid -U $tmp/other.sock file $tmp/other.img
snapstore_fails "16 sampled pages differ" $chain \
    base="$(nbd_uri $tmp/other.sock)"
kill $qemu_pid
stop_nbdkit $nbdkit_pid

# Consolidate offline: tue's changes merge with wed's, then the base
# (mon) with wed's: by commit, into FILE itself, which the chain keeps
# as its base (its sample is taken again); the others read the same.
nbdsnap consolidate $chain tue
check_clean $chain
nbdsnap --json consolidate $chain mon > $tmp/out.json
cat $tmp/out.json
strategy=$(jq -r .job.strategy $tmp/out.json)
check_clean $chain
nbdsnap --json chain $chain | jq -e '[.points[].name] == ["wed","thu"]'
if [ "$strategy" = commit ]; then
    [ "$(md5 $base)" = "${want[wed]}" ] ||
        fail "the base, committed into, is not wed"
    grep "^origin-path $base\$" $chain/manifest
else
    grep '^origin retired' $chain/manifest
fi
start_snapstore $psock $chain
for d in wed thu; do
    [ "$(export_md5 $psock snap/$d)" = "${want[$d]}" ] ||
        fail "after consolidating: snap/$d does not read as snapshot $d"
done

#!/usr/bin/env bash
# nbdkit-snapshot
# docs/deploy.md's TCP with TLS recipe, over an origin on a remote NBD
# server (docs/deploy.md, "Origins"): an nbdkit serves the disk image on
# a socket of its own; the filter's nbdkit reaches it with the nbd
# plugin and serves the volume on loopback TCP with --tls=require and
# a PSK file.  A plaintext client is refused; nbdinfo, nbdcopy,
# qemu-img and nbdsnap backup read the live volume, snap/NAME and
# dirty/FROM over TLS, checked by checksum.

source ./functions.sh
set -e
set -x

requires nbdinfo --version
requires nbdcopy --version
requires nbdsh --version
requires qemu-img --version
requires jq --version
nbdkit --dump-config | grep -qx 'tls=yes' || skip "nbdkit has no TLS"

# The remote origin: a disk image served by a plain nbdkit.
disk=$tmp/disk.img
make_origin $disk 16M
cp $disk $tmp/s1.img
start_nbdkit -P $tmp/remote.pid -U $tmp/remote.sock file $disk
remote=$nbdkit_pid

# The keys: user alice, a 256-bit key in hex, the format of psktool's
# files (and of qemu's keys.psk).
mkdir -m 0700 $tmp/keys
printf 'alice:%s\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" \
       > $tmp/keys/keys.psk
chmod 0600 $tmp/keys/keys.psk
psk=$tmp/keys/keys.psk

# start_tls: the filter's nbdkit on 127.0.0.1:$port, TLS required.  A
# port is picked from one derived from the test's pid; if another
# program has it, nbdkit exits at once ("Address already in use") and
# the next is tried.  nbdkit writes its pid file once it listens.
store=$tmp/disk.snap
start_tls ()
{
    local try i
    for (( try = 0; try < 50; try++ )); do
        port=$(( 20000 + ($$ * 7 + try * 131) % 30000 ))
        rm -f $tmp/tls.pid
        nbdkit -f -P $tmp/tls.pid -i 127.0.0.1 -p $port \
               --tls=require --tls-psk=$psk \
               --filter=$FILTER nbd socket=$tmp/remote.sock \
               snapshot-store=$store >> $tmp/tls.log 2>&1 &
        tls_pid=$!
        for (( i = 0; i < 600; i++ )); do
            [ -s $tmp/tls.pid ] && break
            kill -0 $tls_pid 2>/dev/null || break
            sleep 0.1
        done
        if [ -s $tmp/tls.pid ]; then
            cleanup_fn _cleanup_nbdkit $tls_pid
            return 0
        fi
        wait $tls_pid || :
        grep -q 'Address already in use' $tmp/tls.log ||
            fail "nbdkit with TLS did not start"
    done
    fail "no free TCP port found"
}
start_tls
uri () { echo "nbds://alice@127.0.0.1:$port/$1?tls-psk-file=$psk"; }

# A plaintext client is refused.
if nbdinfo "nbd://127.0.0.1:$port/" > $tmp/plain.out 2>&1; then
    cat $tmp/plain.out
    fail "a client without TLS was served"
fi
cat $tmp/plain.out
# So is a wrong key.
printf 'alice:%s\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" \
       > $tmp/wrong.psk
if nbdinfo "nbds://alice@127.0.0.1:$port/?tls-psk-file=$tmp/wrong.psk" \
       > /dev/null 2>&1; then
    fail "a client with the wrong key was served"
fi

# Over TLS: the live volume, then a snapshot and writes after it.
nbdinfo "$(uri)" | grep -F 'with TLS'
nbdcopy "$(uri)" $tmp/live0.img
cmp $tmp/live0.img $disk
nbdsnap -c $store create s1
REF=$tmp/live.img
cp $disk $REF
REF=$REF nbdsh -c 'h.set_uri_allow_local_file(True)' \
    -c "h.connect_uri('$(uri)')" -c "$ref_ops" \
    -c 'w(pat(0x5a, 70000), 1000000)' -c 'w(pat(0xa5, 4096), 9 << 20)' \
    -c 'z(65536, 4 << 20)' -c 'h.flush()'

nbdcopy "$(uri snap/s1)" $tmp/snap.img
cmp $tmp/snap.img $tmp/s1.img
nbdcopy "$(uri)" $tmp/live1.img
cmp $tmp/live1.img $tmp/live.img

# dirty/s1: the changed blocks, with their live contents; the rest
# reads as zeros (what nbdcopy applies onto the copy of s1).
nbdinfo --map "$(uri dirty/s1)" > $tmp/map
cat $tmp/map
[ "$(awk '$3 == 0' $tmp/map | wc -l)" -ge 2 ] ||
    fail "dirty/s1 reports no changed blocks"
cp $tmp/s1.img $tmp/applied.img
nbdcopy -S 0 --destination-is-zero --request-size=65536 -- "$(uri dirty/s1)" \
    [ nbdkit --exit-with-parent file $tmp/applied.img ]
cmp $tmp/applied.img $tmp/live.img

# qemu-img: its PSK keys file is keys.psk in the credentials dir.
qemu_nbd_opts ()
{
    echo "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=$port,export=$1,tls-creds=tls0"
}
for e in snap/s1 ''; do
    rm -f $tmp/qemu.img
    qemu-img convert -O raw \
        --object tls-creds-psk,id=tls0,endpoint=client,dir=$tmp/keys,username=alice \
        --image-opts "$(qemu_nbd_opts "$e")" $tmp/qemu.img
    if [ -n "$e" ]; then cmp $tmp/qemu.img $tmp/s1.img
    else cmp $tmp/qemu.img $tmp/live.img; fi
done

# nbdsnap backup over TLS: full, then incremental since s1.
nbdsnap backup "$(uri snap/s1)" --to $tmp/full.img
cmp $tmp/full.img $tmp/s1.img
nbdsnap backup "$(uri)" --since s1 --to $tmp/full.img
cmp $tmp/full.img $tmp/live.img
# ... and into a chain.
nbdsnap backup "$(uri snap/s1)" --to $tmp/chain/
nbdsnap --json chain $tmp/chain | jq -e '.points | map(.name) == ["s1"]'

# The origin behind the nbd plugin was frozen by s1 (row).
stop_nbdkit $tls_pid
stop_nbdkit $remote
cmp $disk $tmp/s1.img

echo "$0: ok"

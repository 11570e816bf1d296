#!/usr/bin/env bash
# nbdkit-snapshot
# Damage is refused, not served: a truncated layer, a flipped byte in
# the body of a layer map, of a dirty map and in a map header, a
# damaged manifest, a missing layer, an unexpected file; and a base of
# the wrong size, another file (a copy), or one written since.  For
# each, the snapstore plugin refuses to start with an error naming what
# is wrong, and nbdsnap check reports it (exit status 2, and in
# --json); the undamaged chain and store are clean and serve.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdcopy --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
chain=$tmp/chain
psock=$tmp/plugin.sock

# A chain of three restore points, and the filter's store of the same
# snapshots (row), at rest.
make_origin $origin 16M
start_store
nbdsnap -c $store create s1
nbdsnap backup "$(nbd_uri $sock snap/s1)" --to $chain/
for r in 2 3; do
    random_round $sock $r
    nbdsnap -c $store create s$r
    nbdsnap backup "$(nbd_uri $sock snap/s$r)" --since s$((r-1)) --to $chain
done
s2=$(export_md5 $sock snap/s2)
stop_nbdkit $nbdkit_pid
cp -a $chain $tmp/good-chain
check_clean $chain
check_clean $store

# The layers: the full one, and an increment; a map with set bits.
layers=($(sed -n 's/^layer \([0-9]*\)$/\1/p' $chain/manifest))
full=${layers[0]}
inc=${layers[1]}
dirty=$(sed -n 's/^checkpoint s1 .* map=\([0-9]*\)$/\1/p' $chain/manifest)

# poke FILE OFFSET: flip bit 4 of the byte at OFFSET of FILE.
poke ()
{
    python3 -c "
import sys
with open(sys.argv[1], 'r+b') as f:
    f.seek(int(sys.argv[2])); b = f.read(1)[0]
    f.seek(int(sys.argv[2])); f.write(bytes([b ^ 0x10]))
" "$@"
}

# first_set_byte FILE: the offset of the first nonzero byte of map
# FILE's bitmap pages.
first_set_byte ()
{
    python3 - "$1" <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
print(next(i for i in range(4096, len(data)) if data[i]))
EOF
}

# damaged WANT: the plugin refuses the chain saying WANT, check reports
# it; then the chain is put back as it was.
damaged ()
{
    snapstore_fails "$1" $chain
    check_finds "$1" $chain
    rm -rf $chain
    cp -a $tmp/good-chain $chain
}

truncate -s 1M $chain/layer-$inc.data
damaged "layer-$inc.data: size 1048576 does not match the volume size"

poke $chain/layer-$inc.map $(first_set_byte $chain/layer-$inc.map)
damaged "layer-$inc.map: the bitmap does not match its seal"

poke $chain/dirty-$dirty.map $(first_set_byte $chain/dirty-$dirty.map)
damaged "dirty-$dirty.map: the bitmap does not match its seal"

poke $chain/layer-$full.map 20
damaged "layer-$full.map: header checksum"

poke $chain/manifest 40
damaged "manifest"

rm $chain/layer-$inc.data
damaged "layer-$inc.data: missing: the manifest names layer $inc"

rm $chain/layer-$full.map
damaged "layer-$full.map: missing"

echo "notes" > $chain/README
damaged "README: unexpected file"

cp $chain/layer-$inc.map $chain/layer-999.map
damaged "layer-999.map: unexpected file: not named by the manifest"

# The chain is whole again, and serves.
check_clean $chain
start_snapstore $psock $chain
[ "$(export_md5 $psock snap/s2)" = "$s2" ] || fail "the chain reads wrong"
stop_nbdkit $nbdkit_pid

# The base of the store: of the wrong size.
truncate -s 8M $tmp/small.img
snapstore_fails "size 8388608 does not match the volume size 16777216" \
    $store base=$tmp/small.img
# A copy of the origin is another file.
cp $origin $tmp/copy.img
snapstore_fails "is not the file the store" $store base=$tmp/copy.img
# The recorded origin replaced by another file (check reports it too).
mv $origin $tmp/moved.img
cp $tmp/moved.img $origin
snapstore_fails "is not the file the store" $store
check_finds "device" $store
mv $tmp/moved.img $origin
check_clean $store
# The origin written since the store was used.
dd if=/dev/urandom of=$origin bs=4096 count=1 conv=notrunc
snapstore_fails "16 sampled pages differ" $store
check_finds "sampled pages hash to" $store

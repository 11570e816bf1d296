#!/usr/bin/env bash
# nbdkit-snapshot
# The store is never lost by accident.  Eight parts, each on a store
# (and origin) of its own so that each can fail for its own reason:
#
#  1. a store whose manifest is missing is refused, not wiped and
#     started afresh; with the manifest back, every view is intact;
#  2. a layer or map file the manifest does not name, holding data,
#     is left alone at start-up, and the log names it;
#  3. delete --output inside the store (directly, or through a
#     symlink to the store directory) is refused and changes nothing;
#  4. delete --output on another file system is refused before any
#     job starts (as root: it mounts a tmpfs);
#  5. a bitmap-only checkpoint is a point in time: what was written
#     before it survives kill -9, as with a snapshot;
#  6. a manifest naming a layer that does not exist is refused with
#     a clear error, not an assertion;
#  7. an empty (0-byte) origin is refused with a clear error;
#  8. every file in the store is mode 0600, whatever the mode of the
#     store directory.

source ./functions.sh
set -e
set -x

requires nbdsh --version
requires nbdinfo --version
requires nbdcopy --version
requires jq --version

sock=$tmp/nbd.sock

# section NAME: use origin $tmp/NAME.img (8M, from make_origin) and
# store $tmp/NAME.store from now on.
section ()
{
    origin=$tmp/$1.img
    store=$tmp/$1.store
    make_origin $origin 8M
}

# nbdsnap_refuses WANT ARGS...: nbdsnap ARGS must fail, saying WANT
# (a fixed string) on stderr.
nbdsnap_refuses ()
{
    local want="$1" r=0
    shift
    nbdsnap "$@" > $tmp/out 2> $tmp/err || r=$?
    cat $tmp/out $tmp/err
    [ $r -ne 0 ] || fail "nbdsnap accepted: $*"
    grep -F -- "$want" $tmp/err ||
        fail "nbdsnap $*: error does not say: $want"
}

# store_sums FILE: the MD5 of every layer-* and dirty-* file in
# $store, into FILE; check_sums FILE: each is still there, the same.
store_sums ()
{
    local f n=0
    : > $1
    for f in $store/layer-* $store/dirty-*; do
        [ -e "$f" ] || continue
        echo "$(md5 $f)  $(basename $f)" >> $1
        n=$((n + 1))
    done
    cat $1
    [ $n -gt 0 ] || fail "no layer or dirty map files in $store"
}
check_sums ()
{
    (cd $store && md5sum -c $1) ||
        fail "a layer or dirty map file in $store is gone or changed"
}

# save_views NAME...: save each snap/NAME as $tmp/NAME.img and the
# live volume as $tmp/live.img (for verify_views).
save_views ()
{
    local s
    for s in "$@"; do
        save_export $sock snap/$s $tmp/$s.img
    done
    save_export $sock "" $tmp/live.img
}

# write_flush BYTE OFFSET LENGTH: write LENGTH bytes of BYTE at
# OFFSET on the live volume, and flush.
write_flush ()
{
    nbdsh -u "$(nbd_uri $sock)" \
          -c "h.pwrite(bytes([$1]) * $3, $2)" -c 'h.flush()'
}

# ----------------------------------------------------------------------
# 1. A store without its manifest must not be wiped.  Today nbdkit
# takes it for a new store: it writes a fresh manifest and its start-up
# sweep deletes every layer and dirty map, so every snapshot and every
# write since the first one is lost.  It must refuse to start instead,
# and leave every file as it was.

section p1
start_store
nbdsnap -c $store create s1
write_flush 0x11 $((1024 * 1024)) $((256 * 1024))
nbdsnap -c $store create s2
write_flush 0x22 $((3 * 1024 * 1024 + 512)) 100000
save_views s1 s2
stop_nbdkit $nbdkit_pid
store_sums $tmp/p1.sums

mv $store/manifest $tmp/p1.manifest
start_fails "no manifest" $origin snapshot-store=$store
check_sums $tmp/p1.sums
# (A fresh manifest there would make the next start wipe the store.)
[ ! -e $store/manifest ] || fail "the refused start wrote a manifest"

mv $tmp/p1.manifest $store/manifest
start_store
verify_views $sock $tmp/live.img s1 s2
stop_nbdkit $nbdkit_pid

# ----------------------------------------------------------------------
# 2. A file the manifest does not name is left alone.  Today the
# start-up sweep deletes any layer-N.data, layer-N.map or dirty-N.map
# whose N the manifest does not name, whatever it holds, and says so
# only in a debug message.  A file holding data is kept, and the log
# names it.

section p2
start_store
nbdsnap -c $store create s1
write_flush 0x33 0 65536
stop_nbdkit $nbdkit_pid

head -c $((1024 * 1024)) /dev/urandom > $store/layer-900.data
head -c 8192 /dev/urandom > $store/dirty-901.map
stray_data=$(md5 $store/layer-900.data)
stray_map=$(md5 $store/dirty-901.map)
log_lines=$(cat $tmp/nbdkit.log 2>/dev/null | wc -l)
start_store
stop_nbdkit $nbdkit_pid
[ -f $store/layer-900.data ] || fail "start-up deleted layer-900.data"
[ -f $store/dirty-901.map ] || fail "start-up deleted dirty-901.map"
[ "$(md5 $store/layer-900.data)" = "$stray_data" ] ||
    fail "layer-900.data changed"
[ "$(md5 $store/dirty-901.map)" = "$stray_map" ] ||
    fail "dirty-901.map changed"
tail -n +$((log_lines + 1)) $nbdkit_log > $tmp/p2.log
cat $tmp/p2.log
grep -F layer-900.data $tmp/p2.log ||
    fail "the log does not mention layer-900.data"

# ----------------------------------------------------------------------
# 3. delete --output inside the store is refused.  Today it is
# accepted: the stream hard-links the layer as $store/layer-77.data,
# a name the start-up sweep then deletes, leaving the layer's data
# file a dangling symlink.  Through a symlink to the store directory,
# the final image would be a file of the store too.

section p3
start_store
nbdsnap -c $store create s1
write_flush 0x44 $((2 * 1024 * 1024)) 300000
save_views s1

nbdsnap_refuses "inside the store" -c $store delete s1 --strategy=stream \
                --output=$store/layer-77.data
ln -s $store $tmp/alias
nbdsnap_refuses "inside the store" -c $store delete s1 --strategy=stream \
                --output=$tmp/alias/out.img

nbdsnap -c $store --json list > $tmp/list.json
jq -e '[.checkpoints[].name] == ["s1"]' $tmp/list.json ||
    fail "s1 is not listed any more"
[ ! -e $store/layer-77.data ] && [ ! -L $store/layer-77.data ] ||
    fail "$store/layer-77.data exists"
[ ! -e $store/out.img ] && [ ! -L $store/out.img ] ||
    fail "$store/out.img exists"
stop_nbdkit $nbdkit_pid
start_store
verify_views $sock $tmp/live.img s1
stop_nbdkit $nbdkit_pid

# ----------------------------------------------------------------------
# 4. --output on another file system is refused before any job starts.
# Today the stream runs to its end and only then fails to hard-link
# the layer as the output (EXDEV).  Needs root, to mount a tmpfs.

section p4
if [ "$(id -u)" -ne 0 ]; then
    echo "$0: part 4 skipped: not root"
elif ! { mkdir $tmp/other &&
         mount -t tmpfs -o size=64M tmpfs $tmp/other; }; then
    echo "$0: part 4 skipped: cannot mount a tmpfs"
else
    cleanup_fn umount $tmp/other
    start_store
    if [ "$(stat -c %d $tmp/other)" = "$(stat -c %d $store)" ]; then
        echo "$0: part 4 skipped: $tmp/other is on the store's file system"
    else
        nbdsnap -c $store create s1
        write_flush 0x55 $((4 * 1024 * 1024)) 65536
        # (A cbw store refuses --output whatever the path.)
        if is_cbw; then
            why="--strategy=commit|stream and --output apply to redirect-on-write"
        else
            why="another file system"
        fi
        nbdsnap_refuses "$why" -c $store delete s1 \
                        --strategy=stream --output=$tmp/other/final.img
        nbdsnap -c $store --json jobs > $tmp/jobs.json
        cat $tmp/jobs.json
        jq -e --arg o $tmp/other/final.img \
           '[.jobs[] | select(.name == "s1" or .output == $o)] | length == 0' \
           $tmp/jobs.json || fail "a job was started for the refused delete"
        [ ! -e $tmp/other/final.img ] || fail "final.img was created"
        nbdsnap -c $store --json list |
            jq -e '[.checkpoints[].name] == ["s1"]' ||
            fail "s1 is not listed any more"
    fi
    stop_nbdkit $nbdkit_pid
fi

# ----------------------------------------------------------------------
# 5. A bitmap-only checkpoint is a point in time and flushes like a
# snapshot: what was written before it is durable once it is taken.
# Today it syncs only the dirty map: the newest layer's page map is
# not written, so after kill -9 the unflushed write is gone although
# the checkpoint that follows it survived.

section p5
start_store
nbdsnap -c $store create s1
save_views s1
# No flush: nbdsh (libnbd) does not flush when it closes.
nbdsh -u "$(nbd_uri $sock)" -c 'h.pwrite(b"\x5a" * 65536, 1024 * 1024)'
nbdsnap -c $store create b1 --bitmap-only
stop_nbdkit $nbdkit_pid KILL
python3 - $tmp/live.img <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"\x5a" * 65536, 1024 * 1024)
os.close(fd)
EOF
start_store
nbdsh -u "$(nbd_uri $sock)" \
      -c 'assert h.pread(65536, 1024 * 1024) == b"\x5a" * 65536' ||
    fail "the write made before checkpoint b1 was lost by kill -9"
verify_views $sock $tmp/live.img s1
nbdsnap -c $store --json list |
    jq -e '[.checkpoints[] | "\(.name):\(.kind)"] == ["s1:snapshot", "b1:bitmap"]'
stop_nbdkit $nbdkit_pid

# ----------------------------------------------------------------------
# 6. A manifest whose snapshot names a layer that does not exist is
# refused at start-up with a clear error.  (The CRC is right and
# next-id is above the id: only the reference is wrong.)

section p6
start_store
nbdsnap -c $store create s1
write_flush 0x66 0 65536
nbdsnap -c $store create s2
write_flush 0x67 65536 65536
stop_nbdkit $nbdkit_pid
cat $store/manifest
python3 - $store/manifest <<'EOF'
import re, sys, zlib
path = sys.argv[1]
lines = open(path, "rb").read().decode().splitlines(keepends=True)
assert lines[-1].startswith("crc "), lines[-1]
body = lines[:-1]
edited = False
for i, line in enumerate(body):
    if line.startswith("next-id "):
        body[i] = "next-id %d\n" % max(int(line.split()[1]), 4001)
    elif line.startswith("checkpoint s2 "):
        new = re.sub(r"\blayer=\d+", "layer=4000", line)
        assert new != line, line
        body[i] = new
        edited = True
assert edited, "no checkpoint s2"
text = "".join(body).encode()
with open(path, "wb") as f:
    f.write(text + b"crc 0x%08x\n" % zlib.crc32(text))
EOF
cat $store/manifest
start_fails "the store is damaged" $origin snapshot-store=$store
if grep -F "Assertion" $tmp/err; then
    fail "start-up on a damaged manifest ended in an assertion"
fi

# ----------------------------------------------------------------------
# 7. A 0-byte origin gets a clear error.

section p7
truncate -s 0 $origin
start_fails "empty" $origin snapshot-store=$store

# ----------------------------------------------------------------------
# 8. Every store file is 0600, even in a store directory made 0755
# beforehand: the layers hold the volume's data, and the manifest,
# maps and the rest describe it.  Today the manifest, boot-id and the
# *.map files are created 0644 (less the umask).

section p8
mkdir $store
chmod 0755 $store
start_store
nbdsnap -c $store create s1
write_flush 0x77 0 200000
nbdsnap -c $store create b1 --bitmap-only
write_flush 0x78 $((1024 * 1024)) 200000
nbdsnap -c $store create s2
write_flush 0x79 $((2 * 1024 * 1024)) 200000
nbdsnap -c $store delete b1
nbdsnap -c $store delete s1 --wait
stop_nbdkit $nbdkit_pid
ls -la $store
find $store -type f ! -perm 0600 > $tmp/p8.modes
cat $tmp/p8.modes
[ ! -s $tmp/p8.modes ] || fail "store files not 0600:" $(cat $tmp/p8.modes)

#!/usr/bin/env bash
# nbdsnap backup against stock nbdkit servers (no snapshot filter):
#  - full backups (data plugin; memory plugin over 3 GiB, so block
#    status takes several calls; an eval plugin that answers block
#    status one block at a time) compared with the source;
#  - incremental backups against an export that mimics the filter's
#    dirty/ exports: the data plugin gives the contents, the extentlist
#    filter the map (changed = data, unchanged = hole,zero), and the
#    exportname filter accepts only the dirty/ names nbdsnap must derive;
#  - options, progress and error cases, each with its exact message.
#
# Set VG to a command prefix (e.g. "valgrind -q --error-exitcode=99
# --leak-check=full --log-file=/tmp/vg.%p") to run nbdsnap under it.

source "$abs_top_builddir/tests/functions.sh"
set -e
set -x

requires nbdsh --version
requires nbdinfo --version
requires nbdcopy --version

# $VG runs nbdsnap under it everywhere.
if [ -n "${VG-}" ]; then
    cat > $tmp/nbdsnap-vg <<EOF
#!/bin/sh
exec $VG "$NBDSNAP" "\$@"
EOF
    chmod +x $tmp/nbdsnap-vg
    NBDSNAP=$tmp/nbdsnap-vg
fi
py=python3

# serve NAME ARGS...: nbdkit ARGS on $tmp/NAME.sock until the end.
serve ()
{
    local name="$1"
    shift
    start_nbdkit -P "$tmp/$name.pid" -U "$tmp/$name.sock" "$@"
}

# json_get FILE KEY: a member of the JSON object in FILE.
json_get ()
{
    $py -c 'import json, sys
v = json.load (open (sys.argv[1]))[sys.argv[2]]
print ("null" if v is None else v)' "$1" "$2"
}

sha () { sha256sum "$1" | cut -d' ' -f1; }

#----------------------------------------------------------------------
# Usage errors (no server needed).

expect_exit 1 nbdsnap backup 'nbd+unix:///?socket=/x'
grep -Fx 'nbdsnap: backup: missing --to FILE|DIR' "$err"
grep -F 'Usage: nbdsnap [--json] backup URI --to FILE' "$err"
test ! -s "$out"

expect_exit 1 nbdsnap backup --to "$tmp/f"
grep -Fx 'nbdsnap: backup: missing URI' "$err"
test ! -s "$out"

expect_exit 1 nbdsnap backup a b --to "$tmp/f"
grep -Fx "nbdsnap: backup: unexpected operand 'b'" "$err"
test ! -s "$out"

for opt in --to=x --since=s1 --requests=2; do
    expect_exit 1 nbdsnap -c "$tmp/x.sock" list $opt
    expect_error_line "nbdsnap: list: ${opt%%=*} is an option of backup only"
done
for opt in --progress --progress=2; do
    expect_exit 1 nbdsnap -c "$tmp/x.sock" list $opt
    expect_error_line "nbdsnap: list: --progress is an option of backup, wait, and delete or revert with --wait"
done

for n in 0 65 -1 x 1x ''; do
    expect_exit 1 nbdsnap backup u --to "$tmp/f" --requests="$n"
    expect_error_line \
        "nbdsnap: --requests: invalid value '$n' (expected a number from 1 to 64)"
done
expect_exit 1 nbdsnap backup u --to "$tmp/f" --progress=x
expect_error_line \
    "nbdsnap: --progress: invalid value 'x' (expected a number from 0 to 2147483647)"

# A bad checkpoint name is refused before anything else.
expect_exit 1 nbdsnap backup 'nbd+unix:///?socket=/nonexistent' --since .x \
       --to "$tmp/f"
expect_error_line \
    "nbdsnap: backup: invalid name '.x': name must not start with '.' or '-'"
expect_exit 1 nbdsnap backup 'nbd+unix:///?socket=/nonexistent' --since a/b \
       --to "$tmp/f"
expect_error_line \
    "nbdsnap: backup: invalid name 'a/b': name may contain only letters, digits, '.', '_' and '-'"

# --since needs an export '' or snap/NAME in an NBD URI.
for e in foo snap/ snap/a/b dirty/a 'snap/.x' '%2Fx'; do
    u="nbd+unix:///$e?socket=/nonexistent"
    expect_exit 1 nbdsnap backup "$u" --since s1 --to "$tmp/f"
    ename="$($py -c 'import sys, urllib.parse
print (urllib.parse.unquote (sys.argv[1]))' "$e")"
    expect_error_line "nbdsnap: backup: $u: --since needs the live volume (export '') or a snapshot (export 'snap/NAME'), not export '$ename'"
done
expect_exit 1 nbdsnap backup 'nbd+unix:///snap/%zz?socket=/x' --since s1 \
       --to "$tmp/f"
expect_error_line \
    "nbdsnap: backup: nbd+unix:///snap/%zz?socket=/x: invalid %-escape in the export name"
expect_exit 1 nbdsnap backup 'not-a-uri' --since s1 --to "$tmp/f"
expect_error_line "nbdsnap: backup: not-a-uri: not an NBD URI"

# Bad URIs and servers that are not there: nothing is created.
expect_exit 1 nbdsnap backup 'foo://x' --to "$tmp/f"
grep -E '^nbdsnap: backup: foo://x: connect: .+$' "$err"
test ! -s "$out"
expect_exit 1 nbdsnap backup "nbd+unix:///?socket=$tmp/none.sock" --to "$tmp/f"
grep -E "^nbdsnap: backup: nbd\+unix:///\?socket=$tmp/none.sock: connect: .*No such file or directory\$" "$err"
test "$(wc -l < "$err")" -eq 1
test ! -s "$out"
test ! -e "$tmp/f"

# --progress=FD must name a descriptor open for writing.
expect_exit 1 nbdsnap backup 'nbd+unix:///?socket=/x' --to "$tmp/f" --progress=9
expect_error_line "nbdsnap: --progress=9: Bad file descriptor"
expect_exit 1 nbdsnap backup 'nbd+unix:///?socket=/x' --to "$tmp/f" \
       --progress=3 3</dev/null
expect_error_line "nbdsnap: --progress=3: not open for writing"
test ! -e "$tmp/f"

#----------------------------------------------------------------------
# Full backup: data with holes, a 5.9 MB extent (split into 4 MiB
# reads), and zeros inside data extents.

serve full data size=64M \
  '@65536 0x11*100000 @5242880 (0x41 0x42 0x43 0x44 0x45 0x46 0x47)*900000
   @41943040 "end"'
uri="nbd+unix:///?socket=$tmp/full.sock"
nbdcopy "$uri" "$tmp/full.ref"

# A connection failure leaves an existing FILE alone.
echo precious > "$tmp/full.img"
expect_exit 1 nbdsnap backup "nbd+unix:///?socket=$tmp/none.sock" \
       --to "$tmp/full.img"
test "$(cat "$tmp/full.img")" = precious

# FILE exists and is larger, with other contents: it is truncated.
head -c 70M /dev/urandom > "$tmp/full.img"
expect_exit 0 nbdsnap backup "$uri" --to "$tmp/full.img"
test ! -s "$err"                # no bar: not a terminal
test "$(stat -c %s "$tmp/full.img")" -eq 67108864
test "$(sha "$tmp/full.img")" = "$(sha "$tmp/full.ref")"
# bytes: the data extents that nbdinfo reports.
data_bytes="$(nbdinfo --map "$uri" | awk '$3 == 0 { n += $2 } END { print n }')"
test "$data_bytes" -gt 5000000
grep -Fx "copied $data_bytes bytes ($($py -c "print ('%.1f MiB' % ($data_bytes / 1048576))")) in 3 extents of 67108864 (64.0 MiB)" "$out"
# Holes were not written: far less than 64M is allocated.
test "$(du -k "$tmp/full.img" | cut -f1)" -lt 16384

# --json, --requests 1, and --progress=FD.
rm "$tmp/full.img"
expect_exit 0 nbdsnap --json backup "$uri" --to "$tmp/full.img" --requests 1 \
       --progress=3 3>"$tmp/progress"
test "$(sha "$tmp/full.img")" = "$(sha "$tmp/full.ref")"
test "$(json_get "$out" bytes_copied)" -eq "$data_bytes"
test "$(json_get "$out" extents)" -eq 3
test "$(json_get "$out" size)" -eq 67108864
test "$(json_get "$out" since)" = null
test "$(json_get "$out" export)" = ""
test "$(wc -l < "$out")" -eq 1
test ! -s "$err"
cat "$tmp/progress"
$py - "$tmp/progress" <<'EOF'
import re, sys
lines = open (sys.argv[1]).read ().split ("\n")
assert lines[-1] == "", "no final newline"
lines = lines[:-1]
assert all (re.fullmatch (r"\d+/100", l) for l in lines), lines
n = [int (l.split ("/")[0]) for l in lines]
assert n == sorted (n) and len (set (n)) == len (n), n
assert n[-1] == 100 and n.count (100) == 1 and len (n) >= 3, n
EOF

# --progress: the bar on stderr even when it is not a terminal.
expect_exit 0 nbdsnap backup "$uri" --to "$tmp/full.img" --progress
grep -F '] 100%' "$err"
test "$(tail -c 1 "$err" | od -An -c | tr -d ' ')" = '\n'
test "$(sha "$tmp/full.img")" = "$(sha "$tmp/full.ref")"

# A file that cannot be written.
expect_exit 1 nbdsnap backup "$uri" --to "$tmp/no/such/dir/f"
expect_error_line \
    "nbdsnap: backup: $tmp/no/such/dir/f: No such file or directory"

# Block status fails.
serve bserr --filter=error data size=1M '1*4096' \
             error-extents=EIO error-extents-rate=100%
expect_exit 1 nbdsnap backup "nbd+unix:///?socket=$tmp/bserr.sock" \
       --to "$tmp/bserr.img"
grep -E "^nbdsnap: backup: nbd\+unix:///\?socket=$tmp/bserr.sock: block status at offset 0: .*Input/output error\$" "$err"
grep -Fx "nbdsnap: backup: $tmp/bserr.img: the backup is incomplete and must not be used (0 bytes copied before the failure)" "$err"
test ! -s "$out"

# Reads fail at random while many are in flight: the first failure is
# reported, and nbdsnap waits for the other replies before it
# disconnects (nbdkit 1.32 can abort when a client closes mid-reply).
serve rderr --filter=error data size=64M '(1 2 3)*22369621' \
             error-pread=EIO error-pread-rate=50%
expect_exit 1 nbdsnap backup "nbd+unix:///?socket=$tmp/rderr.sock" \
       --to "$tmp/rderr.img"
grep -E "^nbdsnap: backup: nbd\+unix:///\?socket=$tmp/rderr.sock: read of 4194304 bytes at offset [0-9]+: Input/output error\$" "$err"
grep -E "^nbdsnap: backup: $tmp/rderr.img: the backup is incomplete and must not be used \([0-9]+ bytes copied before the failure\)\$" "$err"
test "$(wc -l < "$err")" -eq 2
test ! -s "$out"
nbdinfo --size "nbd+unix:///?socket=$tmp/rderr.sock" | grep -Fx 67108864

#----------------------------------------------------------------------
# Full backup over 3 GiB: block status takes several 1 GiB calls, and
# one data block straddles the 1 GiB boundary.

serve big memory 3G
big="nbd+unix:///?socket=$tmp/big.sock"
offsets="0 1073709056 2684354560 3221159936"
nbdsh -u "$big" -c "
for off in [${offsets// /, }]:
    h.pwrite ((b'%016x' % off) * 4096, off)
"
head -c 1M /dev/urandom > "$tmp/big.img"
expect_exit 0 nbdsnap --json backup "$big" --to "$tmp/big.img"
test "$(json_get "$out" extents)" -eq 4
test "$(json_get "$out" bytes_copied)" -eq $((4 * 65536))
$py - "$tmp/big.img" $offsets <<'EOF'
import os, sys
f = open (sys.argv[1], "rb")
size = os.fstat (f.fileno ()).st_size
assert size == 3 * 1024**3, size
offs = [int (o) for o in sys.argv[2:]]
for off in offs:
    f.seek (off)
    assert f.read (65536) == (b"%016x" % off) * 4096, off
# The garbage that was there is gone (zeros up to 1M, past block 0).
f.seek (65536)
assert f.read (1048576) == bytes (1048576)
# Around each block, zeros.
for off in offs[1:]:
    f.seek (off - 4096)
    assert f.read (4096) == bytes (4096), off
EOF

#----------------------------------------------------------------------
# A server whose block status answers for one 64K block at most (less
# than asked), and whose reads can fail past an offset: the eval plugin
# serves $src with the map in $types (one line per 64K block).

export src="$tmp/eval.src" types="$tmp/eval.types" failpast="$tmp/failpast"
$py - "$src" "$types" <<'EOF'
import os, sys
bs = 65536
kinds = "DZDDZZDHDZ" * 2        # Data, Zero (hole,zero), data that is zeros
data = bytearray (len (kinds) * bs)
for b, k in enumerate (kinds):
    if k == "D":
        data[b * bs:(b + 1) * bs] = os.urandom (bs)
open (sys.argv[1], "wb").write (data)
open (sys.argv[2], "w").write (
    "".join ("hole,zero\n" if k == "Z" else "0\n" for k in kinds))
EOF
serve eval eval \
  get_size='stat -c %s "$src"' \
  pread='if [ -s "$failpast" ] && [ $4 -ge $(cat "$failpast") ]; then
           echo "EIO injected" >&2; exit 1; fi
         dd if="$src" iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none' \
  extents='b=$(($4 / 65536)); len=$((65536 - $4 % 65536))
           if [ $len -gt $3 ]; then len=$3; fi
           echo $4 $len $(sed -n "$((b + 1))p" "$types")'
ev="nbd+unix:///?socket=$tmp/eval.sock"
expect_exit 0 nbdsnap --json backup "$ev" --to "$tmp/eval.img" --requests 3
cmp "$tmp/eval.img" "$src"
# Runs of D/H blocks: D, DD, DHD in each half.
test "$(json_get "$out" extents)" -eq 6
test "$(json_get "$out" bytes_copied)" -eq $((12 * 65536))

# Reads fail from block 6 on: the first blocks were copied, and the
# failure says the file is incomplete.
echo $((6 * 65536)) > "$failpast"
expect_exit 1 nbdsnap backup "$ev" --to "$tmp/eval.img" --requests 1
grep -E "^nbdsnap: backup: nbd\+unix:///\?socket=$tmp/eval.sock: read of 65536 bytes at offset 393216: Input/output error\$" "$err"
grep -Fx "nbdsnap: backup: $tmp/eval.img: the backup is incomplete and must not be used ($((3 * 65536)) bytes copied before the failure)" "$err"
test ! -s "$out"

# The same failure in an incremental backup, whose blocks before the
# failure were applied: the message says so.
head -c $((20 * 65536)) /dev/urandom > "$tmp/prev.img"
cp "$tmp/prev.img" "$tmp/eval.img"
expect_exit 1 nbdsnap backup "$ev" --since a --to "$tmp/eval.img" --requests 1
grep -Fx "nbdsnap: backup: $tmp/eval.img: the incremental backup was only partly applied ($((3 * 65536)) bytes): the file is neither the previous backup nor the new one; run the same command again to complete it" "$err"
test ! -s "$out"
$py - "$tmp/eval.img" "$tmp/prev.img" "$src" <<'EOF'
import sys
bs = 65536
img, prev, src = (open (f, "rb").read () for f in sys.argv[1:])
for b in range (20):
    s = slice (b * bs, (b + 1) * bs)
    want = src if b in (0, 2, 3) else prev      # D Z D D, then the failure
    assert img[s] == want[s], b
    assert prev[s] != src[s], b                 # so the check can fail
EOF

# A failure at the first read changes nothing.
echo 0 > "$failpast"
cp "$tmp/prev.img" "$tmp/eval.img"
expect_exit 1 nbdsnap backup "$ev" --since a --to "$tmp/eval.img"
grep -Fx "nbdsnap: backup: $tmp/eval.img: unchanged, still the previous backup" "$err"
cmp "$tmp/eval.img" "$tmp/prev.img"
rm "$failpast"

#----------------------------------------------------------------------
# Incremental backups onto the previous backup.  Exports:
#   changed (data):  [64K, 192K) 0x11, [256K, 320K) zeros,
#                    [1M, 6M) a 7-byte pattern, [7340132, +4900) "tail!"
#   changed, reported as zero only (2): [512K, 576K) zeros
#   changed, reported as hole only (1): [640K, 704K) 0x55
#     (the filter does not report these, but anything other than
#     hole,zero is applied, to be safe)
#   unchanged (hole,zero): everything else, including [384K, 448K)
#                    whose contents are 0x33: they must not be copied.

cat > "$tmp/dirty.map" <<'EOF'
65536 131072
262144 65536 0
524288 65536 zero
655360 65536 hole
1048576 5242880
7340132 4900
EOF
START_EXPORT=dirty/s1 serve dirty -r --filter=exportname --filter=extentlist data size=8M \
  '@65536 0x11*131072 @393216 0x33*65536 @655360 0x55*65536
   @1048576 (0x61 0x62 0x63 0x64 0x65 0x66 0x67)*749000
   @7340132 "tail!"*980' \
  extentlist="$tmp/dirty.map" \
  exportname=dirty/s1/s2 exportname=dirty/s1 exportname-strict=true
sock="$tmp/dirty.sock"

head -c 8M /dev/urandom > "$tmp/prev.img"
$py - "$tmp/prev.img" "$tmp/expected.img" <<'EOF'
import sys
e = bytearray (open (sys.argv[1], "rb").read ())
e[65536:196608] = b"\x11" * 131072
e[262144:327680] = bytes (65536)
e[524288:589824] = bytes (65536)
e[655360:720896] = b"\x55" * 65536
e[1048576:6291456] = (b"abcdefg" * 749000)[:5242880]
e[7340132:7340132 + 4900] = b"tail!" * 980
open (sys.argv[2], "wb").write (e)
EOF
changed=$((131072 + 65536 + 65536 + 65536 + 5242880 + 4900))

# The exportname filter accepts no other name: a full backup of
# snap/s2 itself is refused, which proves the filter works.
expect_exit 1 nbdsnap backup "nbd+unix:///snap/s2?socket=$sock" \
       --to "$tmp/x.img"
grep -E "^nbdsnap: backup: nbd\+unix:///snap/s2\?socket=$sock: connect: .*no export named 'snap/s2'" "$err"

# snap/s2 since s1 -> dirty/s1/s2; '' since s1 -> dirty/s1, whether the
# path is absent or "/"; escapes in the path are decoded.
paths=(/snap/s2 /snap%2Fs2 '' /)
exports=(dirty/s1/s2 dirty/s1/s2 dirty/s1 dirty/s1)
for i in 0 1 2 3; do
    path="${paths[i]}" to="${exports[i]}"
    cp "$tmp/prev.img" "$tmp/inc.img"
    expect_exit 0 nbdsnap --json backup "nbd+unix://$path?socket=$sock" \
           --since s1 --to "$tmp/inc.img"
    test "$(json_get "$out" export)" = "$to"
    test "$(json_get "$out" since)" = s1
    test "$(json_get "$out" bytes_copied)" -eq "$changed"
    test "$(json_get "$out" extents)" -eq 6
    test "$(json_get "$out" size)" -eq 8388608
    cmp "$tmp/inc.img" "$tmp/expected.img"
done

# Human output, one read at a time, and progress.
cp "$tmp/prev.img" "$tmp/inc.img"
expect_exit 0 nbdsnap backup "nbd+unix:///snap/s2?socket=$sock" --since s1 \
       --to "$tmp/inc.img" --requests 1 --progress=3 3>"$tmp/progress"
grep -Fx "copied $changed bytes (5.3 MiB) in 6 extents of 8388608 (8.0 MiB) since s1" "$out"
test ! -s "$err"
tail -n 1 "$tmp/progress" | grep -Fx 100/100
cmp "$tmp/inc.img" "$tmp/expected.img"

# The previous backup must exist and have the export's size; then it
# is left alone.
expect_exit 1 nbdsnap backup "nbd+unix:///snap/s2?socket=$sock" --since s1 \
       --to "$tmp/missing.img"
expect_error_line "nbdsnap: backup: $tmp/missing.img: No such file or directory"
test ! -e "$tmp/missing.img"
head -c 4M "$tmp/prev.img" > "$tmp/short.img"
expect_exit 1 nbdsnap backup "nbd+unix:///snap/s2?socket=$sock" --since s1 \
       --to "$tmp/short.img"
expect_error_line "nbdsnap: backup: $tmp/short.img: size 4194304, expected 8388608 (the previous backup of this volume)"
test "$(wc -l < "$err")" -eq 1
cmp "$tmp/short.img" <(head -c 4M "$tmp/prev.img")

# An unknown checkpoint: the server has no such dirty export.
cp "$tmp/prev.img" "$tmp/inc.img"
expect_exit 1 nbdsnap backup "nbd+unix:///snap/s2?socket=$sock" --since s0 \
       --to "$tmp/inc.img"
grep -E "^nbdsnap: backup: nbd\+unix:///dirty/s0/s2\?socket=$sock: connect: .*no export named 'dirty/s0/s2'" "$err"
test ! -s "$out"
cmp "$tmp/inc.img" "$tmp/prev.img"

echo "$0: ok"

#!/usr/bin/env bash
# nbdkit-snapshot
# The control socket: mode 0600 whatever the umask; every error of
# the protocol gives {"ok":false,"error":...} with the documented
# message; garbage, oversized, half-closed and idle connections do not
# stop it serving others; snapshot-control= puts the socket elsewhere
# with a symlink in the store; nbdsnap finds it through -c STORE-DIR,
# -c SOCKET and NBDSNAP_CONTROL.

source ./functions.sh
set -e
set -x

requires python3 --version
requires jq --version

origin=$tmp/origin.img
store=$tmp/store
sock=$tmp/nbd.sock
make_origin $origin 8M

old_umask=$(umask)
umask 000
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store \
             snapshot-create=s1
umask $old_umask
pid=$nbdkit_pid

test -S $store/control.sock
[ "$(stat -c %a $store/control.sock)" = 600 ]

cat > $tmp/control.py <<'EOF'
import json, os, socket, sys, threading

path = sys.argv[1]
TIMEOUT = 30 * int(os.environ.get("SNAPSHOT_TEST_SLOWDOWN", "1"))

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(path)
    return s

def read_line(s):
    """Read one line; b"" if the server closes without a reply."""
    buf = b""
    while b"\n" not in buf:
        try:
            d = s.recv(65536)
        except ConnectionResetError:
            break
        if not d:
            break
        buf += d
    assert buf == b"" or buf.endswith(b"\n"), \
        "reply %r does not end with a newline" % buf[:200]
    assert buf.count(b"\n") <= 1, "more than one reply line: %r" % buf
    return buf

def parse(line):
    r = json.loads(line.decode("utf-8"))
    assert isinstance(r, dict) and isinstance(r.get("ok"), bool), r
    if not r["ok"]:
        assert isinstance(r.get("error"), str) and r["error"], r
    return r

def send(s, raw):
    # The server may close a connection as soon as it has seen enough
    # of a bad request; its reply is still there to read.
    try:
        s.sendall(raw)
    except (BrokenPipeError, ConnectionResetError):
        pass

def request(raw, shut=False):
    s = connect()
    send(s, raw)
    if shut:
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    line = read_line(s)
    s.close()
    return line

def error(raw, want=None, prefix=None, **kw):
    line = request(raw, **kw)
    assert line, "no reply to %r" % raw[:100]
    r = parse(line)
    assert r["ok"] is False, "%r: %r" % (raw[:100], r)
    if want is not None:
        assert r["error"] == want, "%r: %r, expected %r" % \
            (raw[:100], r["error"], want)
    if prefix is not None:
        assert any(r["error"].startswith(p) for p in prefix), \
            "%r: %r, expected one of %r" % (raw[:100], r["error"], prefix)
    print("%r -> %r" % (raw[:60], r["error"]))

def check_list():
    r = parse(request(b'{"cmd":"list"}\n'))
    assert r["ok"] is True, r
    assert [c["name"] for c in r["checkpoints"]] == ["s1"], r

check_list()

# Bad JSON and requests that are not what the protocol wants.
error(b"garbage\n", prefix=["invalid request: "])
error(b"{\n", prefix=["invalid request: "])
error(b'{"cmd":"list"\n', prefix=["invalid request: "])
error(b"[1, 2]\n", prefix=["invalid request: "])
error(b'"list"\n', prefix=["invalid request: "])
error(b"\xff\xfe\x00\x01 junk\n", prefix=["invalid request: "])
error(b'{"cmd":"list"}}\n', prefix=["invalid request: "])
error(b'{"cmd":"list","cmd":"create","name":"x"}\n',
      want='invalid request: at byte 14: repeated key "cmd"')
error(b'{"cmd":"list","c\\u006dd":"create","name":"x"}\n',
      want='invalid request: at byte 14: repeated key "cmd"')
error(b'{"cmd":"wait","job":NaN}\n',
      want="invalid request: at byte 20: unexpected character")
error(b'{"cmd":"wait","job":18446744073709551617}\n',
      want="invalid request: at byte 20: integer out of range")
# (The spec gives no message for these two: any error will do.)
error(b"{}\n")
error(b'{"cmd":1}\n')
check_list()

# The documented messages.
error(b'{"cmd":"frob"}\n', want="unknown command 'frob'")
error(b'{"cmd":"info"}\n', want='missing "name"')
error(b'{"cmd":"create"}\n', want='missing "name"')
error(b'{"cmd":"info","name":"nosuch"}\n', want="no checkpoint named 'nosuch'")
error(b'{"cmd":"create","name":"s1"}\n', want="checkpoint 's1' already exists")
error(b'{"cmd":"create","name":"../x"}\n', prefix=["invalid name '../x': "])
error(b'{"cmd":"create","name":""}\n', prefix=["invalid name '': "])
# The reply is JSON even when the name needs escaping.
error(b'{"cmd":"create","name":"a\\"b\\\\c"}\n',
      prefix=["invalid name 'a\"b\\c': "])
check_list()

# JSON string escapes are decoded: s\u0031 is s1.
r = parse(request(b'{"cmd":"info","name":"s\\u0031"}\n'))
assert r["ok"] is True and r["checkpoint"]["name"] == "s1", r
# Whitespace and key order do not matter.
r = parse(request(b' { "name" : "s1" ,\t"cmd" : "info" } \n'))
assert r["ok"] is True and r["checkpoint"]["name"] == "s1", r

# Too long: 64 KiB at most.  Then a request that never ends.
pad = b"x" * (70 * 1024)
error(b'{"cmd":"list","pad":"' + pad + b'"}\n', want="request too long (more than 65536 bytes)")
error(b"y" * (4 * 1024 * 1024), want="request too long (more than 65536 bytes)")
check_list()

# Half-closed: a partial request, then EOF.  The server may answer
# with an error or just close, but must not hang or stop serving.
for raw in (b'{"cmd":"li', b"", b'{"cmd":"list"}'):
    line = request(raw, shut=True)
    if line:
        parse(line)
    print("%r then EOF -> %r" % (raw, line))
check_list()

# Connect and go away at once.
for i in range(10):
    connect().close()
check_list()

# An idle client with half a request does not hold up others.
idle = connect()
idle.sendall(b'{"cmd":')
check_list()
idle2 = connect()
check_list()
idle.close()
idle2.close()

# Many clients at once.
errors = []
def client():
    try:
        check_list()
    except Exception as ex:
        errors.append(ex)
threads = [threading.Thread(target=client) for i in range(20)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors

check_list()
print("control socket OK")
EOF

python3 $tmp/control.py $store/control.sock

# nbdkit is alive and well.
kill -0 $pid
nbdsnap -c $store --json list | jq -e '[.checkpoints[].name] == ["s1"]'
[ "$(export_md5 $sock snap/s1)" = "$(md5 $origin)" ]

# Ways for nbdsnap to find the socket.
nbdsnap -c $store list | grep -w s1
nbdsnap -c $store/control.sock list | grep -w s1
NBDSNAP_CONTROL=$store nbdsnap list | grep -w s1
NBDSNAP_CONTROL=$store/control.sock nbdsnap list | grep -w s1
NBDSNAP_CONTROL=$tmp/nowhere nbdsnap -c $store list | grep -w s1

# Where there is no server.
mkdir $tmp/empty
if nbdsnap -c $tmp/empty list 2> $tmp/err; then
    fail "nbdsnap -c $tmp/empty worked"
fi
cat $tmp/err
grep -F "nbdsnap: $tmp/empty/control.sock: connect: No such file or directory" $tmp/err
if nbdsnap -c $tmp/nowhere list 2> $tmp/err; then
    fail "nbdsnap -c $tmp/nowhere worked"
fi
cat $tmp/err
grep -F "nbdsnap: $tmp/nowhere: connect: No such file or directory" $tmp/err

stop_nbdkit $pid

# snapshot-control=SOCKET: the socket is there, mode 0600, and the
# store has a symlink to it.
umask 000
start_nbdkit -P $tmp/nbdkit.pid -U $sock \
             --filter=$FILTER file $origin snapshot-store=$store \
             snapshot-control=$tmp/ctl.sock
umask $old_umask
pid=$nbdkit_pid
test -S $tmp/ctl.sock
[ "$(stat -c %a $tmp/ctl.sock)" = 600 ]
test -L $store/control.sock
[ "$(readlink -f $store/control.sock)" = "$(readlink -f $tmp/ctl.sock)" ]
nbdsnap -c $tmp/ctl.sock list | grep -w s1
nbdsnap -c $store list | grep -w s1
NBDSNAP_CONTROL=$tmp/ctl.sock nbdsnap --json create s2 |
    jq -e '.checkpoint.name == "s2"'
python3 - $tmp/ctl.sock <<'EOF'
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30 * int(os.environ.get("SNAPSHOT_TEST_SLOWDOWN", "1")))
s.connect(sys.argv[1])
s.sendall(b"garbage\n")
r = json.loads(s.makefile("rb").readline())
assert r["ok"] is False and r["error"].startswith("invalid request: "), r
EOF
nbdsnap -c $store --json list | jq -e '[.checkpoints[].name] == ["s1", "s2"]'
stop_nbdkit $pid

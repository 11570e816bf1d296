#!/usr/bin/env python3
# Pack a store directory into the fuzzers' archive format (fuzz.h:
# fuzz_unpack), preceded by a flag byte:
#
#   pack-store.py FLAGS DIR OUTPUT
#
# Each regular file becomes: u8 namelen, name, u32 size, u8 nextents,
# then its non-zero stretches as extents (u32 offset, u16 len, data),
# so that a sparse layer of a large volume packs into a few bytes.
# Sockets and the lock file are left out.
import os
import struct
import sys

MAX_EXTENT = 0xffff
MAX_EXTENTS = 255


def extents(data):
    out = []
    i = 0
    n = len(data)
    while i < n and len(out) < MAX_EXTENTS:
        # The next non-zero byte, a 4 KiB page at a time where all zero.
        while i < n and data[i] == 0:
            if data[i:i + 4096].count(0) == len(data[i:i + 4096]):
                i += 4096
            else:
                i += 1
        if i >= n:
            break
        j = i
        # Extend until a run of 64 zero bytes (or the extent is full).
        while j < n and j - i < MAX_EXTENT:
            if data[j] == 0 and data[j:j + 64].count(0) == len(data[j:j + 64]):
                break
            j += 1
        out.append((i, data[i:j]))
        i = j
    return out


def main():
    flags, src, dst = int(sys.argv[1], 0), sys.argv[2], sys.argv[3]
    blob = bytearray([flags])
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name == "lock" or not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        ext = extents(data)
        raw = name.encode()
        blob += bytes([len(raw)]) + raw
        blob += struct.pack("<IB", len(data), len(ext))
        for off, chunk in ext:
            blob += struct.pack("<IH", off, len(chunk)) + chunk
    with open(dst, "wb") as f:
        f.write(blob)


main()

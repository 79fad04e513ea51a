#!/usr/bin/env python3
"""Reference value of the built-in `digest` guest (vmm/guests/digest.c).

    scripts/digest-ref.py [PAGES [ROUNDS]]      # defaults 256 16 -> 30b195e7b3c73956

Prints the 16 hex digits the guest prints after `digest=` for the same parameters, so a
migrated run can be checked without running the guest a second time.
"""
import sys

M = 0xFFFFFFFF


def rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & M


def digest(pages=256, rounds=16):
    if pages == 0 or pages & (pages - 1):
        raise SystemExit("pages must be a power of two")
    # Only one u32 every 64 bytes of each page is ever read or written: 64 words per page.
    mem = []
    for pg in range(pages):
        s = ((pg * 0x9E3779B9) & M) ^ 0x6D2B79F5
        if not s:
            s = 1
        words = []
        for _ in range(64):
            s ^= (s << 13) & M
            s ^= s >> 17
            s ^= (s << 5) & M
            words.append(s)
        mem.append(words)
    a, b = 0x243F6A88, 0x85A308D3
    mask = pages - 1
    for r in range(1, rounds + 1):
        stride = ((r * 0x9E3779B9) & M) | 1
        for i in range(pages):
            pg = (i * stride + r) & M & mask
            w = mem[pg]
            a ^= pg
            for k in range(64):
                x = w[k]
                a = (rotl(a ^ x, 7) + b) & M
                b = rotl((b + x) & M, 13) ^ a
                w[k] = a ^ rotl(x, 3)
    return "%08x%08x" % (a, b)


if __name__ == "__main__":
    args = [int(x, 0) for x in sys.argv[1:3]]
    print(digest(*args))

/*
 * memtouch: stamps every page of a working set once per pass and checks the
 * previous pass's stamp, so pages lost or corrupted by migration show up as
 * bad pages.
 */
#include "lib.h"

#define STAMP_MAGIC 0x554D454Du
#define STAMP_XOR 0xA5A5A5A5u
#define PAGE_WORDS 1024

int main(const struct mb_info *mbi)
{
    u32 base = 0x1000000, pages = 4096, passes = 0, pause = 0, random = 0;
    const struct arg args[] = {
        { "base", &base },
        { "pages", &pages },
        { "passes", &passes },
        { "pause", &pause },
        { "random", &random },
    };
    parse_cmdline(mbi, args, 5);
    /* A random order needs a power-of-two page count (the permutation is i*odd+p mod 2^n). */
    if (pages & (pages - 1))
        random = 0;

    puts("memtouch base=0x");
    put_hex(base);
    puts(" pages=");
    put_dec(pages);
    putc('\n');

    /* Locals, not the parsed variables, so the loops keep them in registers. */
    const u32 n = pages;
    u32 total_bad = 0;
    for (u32 p = 1;; p++) {
        u32 bad = 0;
        const u32 prev = p - 1;
        const u32 old_key = STAMP_MAGIC ^ prev ^ STAMP_XOR;
        const u32 new_key = STAMP_MAGIC ^ p ^ STAMP_XOR;
        const u32 stride = (p * 0x9E3779B9u) | 1, mask = n - 1;
        /* RAM starts with arbitrary contents, so pass 1 only writes. */
        const int check = p > 1;
        for (u32 k = 0; k < n; k++) {
            u32 i = random ? (k * stride + p) & mask : k;
            volatile u32 *w = (volatile u32 *)(base + i * (PAGE_WORDS * 4));
            if (check) {
                u32 diff = w[0] ^ STAMP_MAGIC;
                diff |= w[1] ^ i;
                diff |= w[2] ^ prev;
                diff |= w[3] ^ old_key ^ i;
                bad += diff != 0;
            }
            w[0] = STAMP_MAGIC;
            w[1] = i;
            w[2] = p;
            w[3] = new_key ^ i;
        }
        total_bad += bad;

        puts("pass=");
        put_dec(p);
        puts(" bad=");
        put_dec(bad);
        puts(" total_bad=");
        put_dec(total_bad);
        putc('\n');

        if (passes && p == passes)
            break;
        /* The asm keeps the compiler from deleting the delay loop. */
        for (u32 k = pause; k; k--)
            __asm__ volatile("" : "+r"(k));
    }

    puts("memtouch done total_bad=");
    put_dec(total_bad);
    putc('\n');
    return 0;
}

/*
 * digest: a deterministic computation whose result depends on every word it
 * wrote, in an order that changes every round, so a run that was migrated
 * part way must print the same digest as one that was not.
 */
#include "lib.h"

#define PAGE_WORDS 1024
/* One word every 64 bytes keeps the work per page small but spans it all. */
#define WORD_STRIDE 16
#define WORDS_PER_PAGE (PAGE_WORDS / WORD_STRIDE)

static inline u32 rotl(u32 x, int r)
{
    return (x << r) | (x >> (32 - r));
}

int main(const struct mb_info *mbi)
{
    u32 base = 0x1000000, pages = 256, rounds = 16;
    const struct arg args[] = {
        { "base", &base },
        { "pages", &pages },
        { "rounds", &rounds },
    };
    parse_cmdline(mbi, args, 3);

    puts("digest start pages=");
    put_dec(pages);
    puts(" rounds=");
    put_dec(rounds);
    putc('\n');

    /* The permutation below needs a power-of-two page count. */
    if (pages == 0 || (pages & (pages - 1))) {
        puts("digest error: pages must be a power of two\n");
        return 1;
    }
    u32 mask = pages - 1;

    /*
     * Seed each page from its index. Only these words are ever read, so the
     * result does not depend on what RAM held before.
     */
    for (u32 pg = 0; pg < pages; pg++) {
        volatile u32 *w = (volatile u32 *)(base + pg * (PAGE_WORDS * 4));
        u32 s = (pg * 0x9E3779B9u) ^ 0x6D2B79F5u;
        if (!s)
            s = 1;
        for (u32 k = 0; k < WORDS_PER_PAGE; k++) {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            w[k * WORD_STRIDE] = s;
        }
    }

    u32 a = 0x243F6A88u, b = 0x85A308D3u;
    for (u32 r = 1; r <= rounds; r++) {
        /* Odd stride: i -> i * stride + r is a permutation mod 2^n. */
        u32 stride = (r * 0x9E3779B9u) | 1;
        for (u32 i = 0; i < pages; i++) {
            u32 pg = (i * stride + r) & mask;
            volatile u32 *w = (volatile u32 *)(base + pg * (PAGE_WORDS * 4));
            a ^= pg;
            for (u32 k = 0; k < WORDS_PER_PAGE; k++) {
                u32 x = w[k * WORD_STRIDE];
                a = rotl(a ^ x, 7) + b;
                b = rotl(b + x, 13) ^ a;
                /* Written back so later rounds read this round's state. */
                w[k * WORD_STRIDE] = a ^ rotl(x, 3);
            }
        }
        puts("round=");
        put_dec(r);
        putc('\n');
    }

    puts("digest=");
    put_hex_width(a, 8);
    put_hex_width(b, 8);
    putc('\n');
    puts("digest done\n");
    return 0;
}

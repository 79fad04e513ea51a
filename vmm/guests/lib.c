#include "lib.h"

#define COM1 0x3F8
#define COM1_LSR (COM1 + 5)
#define LSR_THR_EMPTY 0x20

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

void putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THR_EMPTY))
        ;
    outb(COM1, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

/* Repeated subtraction instead of division: no libgcc, and it is cheap. */
static const u32 pow10[] = {
    1000000000u, 100000000u, 10000000u, 1000000u, 100000u,
    10000u, 1000u, 100u, 10u, 1u,
};

void put_dec(u32 v)
{
    int started = 0;
    for (int i = 0; i < 10; i++) {
        char d = '0';
        while (v >= pow10[i]) {
            v -= pow10[i];
            d++;
        }
        if (d != '0' || started || i == 9) {
            putc(d);
            started = 1;
        }
    }
}

static const char hexdig[] = "0123456789abcdef";

void put_hex_width(u32 v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        putc(hexdig[(v >> (i * 4)) & 0xf]);
}

void put_hex(u32 v)
{
    int digits = 1;
    while (digits < 8 && (v >> (digits * 4)))
        digits++;
    put_hex_width(v, digits);
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Parses [s, end) as decimal or 0x-hex; returns 0 if malformed or too big. */
static int parse_u32(const char *s, const char *end, u32 *out)
{
    u32 v = 0;
    if (s == end)
        return 0;
    if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        if (end - s > 8)
            return 0;
        for (; s < end; s++) {
            char c = *s;
            u32 d;
            if (c >= '0' && c <= '9')
                d = (u32)(c - '0');
            else if (c >= 'a' && c <= 'f')
                d = (u32)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                d = (u32)(c - 'A' + 10);
            else
                return 0;
            v = (v << 4) | d;
        }
    } else {
        for (; s < end; s++) {
            char c = *s;
            if (c < '0' || c > '9')
                return 0;
            u32 d = (u32)(c - '0');
            if (v > 429496729u || (v == 429496729u && d > 5))
                return 0;
            v = v * 10 + d;
        }
    }
    *out = v;
    return 1;
}

void parse_cmdline(const struct mb_info *mbi, const struct arg *args, int n)
{
    if (!mbi || !(mbi->flags & MB_INFO_CMDLINE) || !mbi->cmdline)
        return;
    const char *p = (const char *)mbi->cmdline;
    for (;;) {
        while (is_space(*p))
            p++;
        if (!*p)
            return;
        const char *tok = p;
        const char *eq = NULL;
        while (*p && !is_space(*p)) {
            if (*p == '=' && !eq)
                eq = p;
            p++;
        }
        /* Tokens without '=' (such as a kernel file name) carry no value. */
        if (!eq)
            continue;
        for (int i = 0; i < n; i++) {
            const char *k = args[i].key;
            const char *t = tok;
            while (*k && t < eq && *k == *t) {
                k++;
                t++;
            }
            if (!*k && t == eq) {
                parse_u32(eq + 1, p, args[i].value);
                break;
            }
        }
    }
}

void halt(void)
{
    puts("halted\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}

/*
 * Minimal runtime for the bare-metal test guests: UART output, number
 * printing and command-line parsing. No libc and no libgcc, so nothing
 * here may divide 64-bit values.
 */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NULL ((void *)0)

/* Multiboot v1 information structure (only the fields the guests read). */
struct mb_info {
    u32 flags;
    u32 mem_lower;
    u32 mem_upper;
    u32 boot_device;
    u32 cmdline;
};

#define MB_INFO_CMDLINE (1u << 2)

/* One recognised `key=value` command-line parameter. */
struct arg {
    const char *key;
    u32 *value;
};

void putc(char c);
void puts(const char *s);
/* Unsigned decimal, no padding. */
void put_dec(u32 v);
/* Lowercase hex without prefix or leading zeros. */
void put_hex(u32 v);
/* Lowercase hex, exactly `digits` digits (1..8), zero padded. */
void put_hex_width(u32 v, int digits);

/*
 * Sets each `args[i].value` whose key appears as `key=value` in the
 * multiboot command line. Values are decimal or 0x-prefixed hex; tokens
 * with unknown keys or malformed values are ignored.
 */
void parse_cmdline(const struct mb_info *mbi, const struct arg *args, int n);

void halt(void) __attribute__((noreturn));

int main(const struct mb_info *mbi);

#endif

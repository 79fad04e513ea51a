/*
 * Multiboot v1 header and 32-bit entry point shared by all guests.
 */

#define MB_MAGIC      0x1BADB002
/* bit 0: page-align modules, bit 1: memory info, bit 16: address fields valid */
#define MB_FLAGS      0x00010003
#define MB_BOOT_MAGIC 0x2BADB002
#define STACK_SIZE    16384

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header         /* header_addr */
    .long _load_start       /* load_addr */
    .long _load_end         /* load_end_addr */
    .long _bss_end          /* bss_end_addr */
    .long _start            /* entry_addr */

    .text
    .globl _start
    .type _start, @function
_start:
    /*
     * Segments are already flat; reloading them would need a GDT in guest
     * memory, which the loader does not promise.
     */
    cli
    cld
    movl $stack_top, %esp
    xorl %ebp, %ebp

    /* Only trust EBX when the loader says it is multiboot info. */
    xorl %edx, %edx
    cmpl $MB_BOOT_MAGIC, %eax
    jne 1f
    movl %ebx, %edx
1:
    /* Keep the stack 16-byte aligned at the call, as the ABI expects. */
    subl $12, %esp
    pushl %edx
    call main
    addl $16, %esp
    call halt
2:
    cli
    hlt
    jmp 2b
    .size _start, . - _start

    .bss
    .align 16
stack_bottom:
    .skip STACK_SIZE
stack_top:

    /* The guests never need an executable stack. */
    .section .note.GNU-stack, "", @progbits

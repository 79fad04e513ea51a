#!/usr/bin/env python3
"""Splits the CPU samples of each umemd process in a `perf record -a` profile into the stages
a page goes through (docs/PERFORMANCE.md has the table this makes, and how it was made).

    perf record -a -g -o perf.data -- target/release/umem-bench postcopy-1g-prefilled-idle
    scripts/perf-stages.py perf.data                      # shares per umemd process (pid)
    scripts/perf-stages.py perf.data 926:source:220 ...   # PID:LABEL:CPU_MS: in ms per GiB

The stage of a sample is the first whose pattern matches the sampled function's name; what
matches none (spinlocks and interrupts re-enabled, softirq network processing, scheduling,
syscall entry) is "other". On a guest whose kernel runs under a hypervisor, samples taken
with interrupts off land where they are enabled again, so "other" also holds part of the
page allocation and network work: the split is approximate.
"""
import collections
import re
import subprocess
import sys

STAGES = [
    ("AEAD (TLS)", r"aes|gcm|gfmul|ghash|chacha|poly1305|ring_core|ring::aead"),
    ("read guest RAM", r"is_zero|seek_hole|llseek|find_segments|segments|filemap_map_pages|"
     r"next_uptodate_folio|exc_page_fault|unmap_page_range|handle_mm_fault|"
     r"workingset_activation|folio_mark_accessed|set_pte_range|do_read_fault|__do_fault"),
    ("copy to/from TLS records", r"__memmove|memcpy"),
    ("receive", r"_copy_to_iter|tcp_recvmsg|skb_copy_datagram|__skb_datagram_iter|recvfrom|"
     r"__libc_recv"),
    ("place", r"_copy_from_user|mfill|userfaultfd|shmem_add_to_page_cache|shmem_alloc|"
     r"shmem_get_folio|shmem_mfill|shmem_write|memcg|try_charge|page_counter|"
     r"copy_folio_from_iter|generic_perform_write|alloc_pages|alloc_frozen|"
     r"get_page_from_freelist|rmqueue|clear_page|FaultHandler::place|lru|folio_batch|"
     r"folio_add|__list_del|get_mem_cgroup|pwrite"),
    ("send", r"_copy_from_iter|splice|sendfile|skb_|tcp_|ip_|dev_queue|loopback|netif|net_rx|"
     r"process_backlog|pipe|writev|sendto|__sys_send|sock_|inet_|folios_put_refs|fput|fdget"),
]
# Thread names of umemd (its main thread is "umemd").
UMEMD_THREADS = {"umemd", "session", "peer-reader", "urgent-pages", "faults", "heartbeats"}


def samples(data):
    out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,tid,ip,sym", "-G"],
                         capture_output=True, text=True, check=True).stdout
    per, comms = collections.defaultdict(collections.Counter), collections.defaultdict(set)
    for line in out.splitlines():
        m = re.match(r"\s*(\S.*?)\s+(\d+)/(\d+)\s+(\S+)\s+(.*)$", line)
        if m:
            pid = int(m.group(2))
            per[pid][m.group(5).strip()] += 1
            comms[pid].add(m.group(1))
    return {p: c for p, c in per.items() if comms[p] & UMEMD_THREADS}


def split(counter):
    rx = [(n, re.compile(p)) for n, p in STAGES]
    st = collections.Counter()
    for sym, n in counter.items():
        st[next((name for name, r in rx if r.search(sym)), "other")] += n
    return st


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    per = samples(sys.argv[1])
    names = [n for n, _ in STAGES] + ["other"]
    if len(sys.argv) == 2:
        for pid in sorted(per):
            st, total = split(per[pid]), sum(per[pid].values())
            print(f"pid {pid}: {total} samples: " +
                  ", ".join(f"{n} {100 * v / total:.1f}%" for n, v in st.most_common()))
        return
    print("| side | " + " | ".join(names) + " | total |")
    print("|" + "---|" * (len(names) + 2))
    for arg in sys.argv[2:]:
        pid, label, cpu = arg.split(":")
        c = per.get(int(pid))
        if not c:
            sys.exit(f"no umemd samples of pid {pid}")
        st, total, cpu = split(c), sum(c.values()), float(cpu)
        cells = [f"{st[n] * cpu / total:.0f}" if st[n] else "-" for n in names]
        print(f"| {label} | " + " | ".join(cells) + f" | {cpu:.0f} |")


if __name__ == "__main__":
    main()

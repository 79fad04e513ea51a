//! `vmm`: a small KVM virtual machine monitor whose guest RAM lives in a memfd, so that the
//! host's `umemd` can migrate it.
//!
//! Reading order for one migrated page: [`memory`] (the memfd), [`migration`] (handing it to
//! umemd), then umemd's `source` and `dest` modules, then back here in [`vm`] and [`vcpu`].
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod control;
pub mod devices;
pub mod guests;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod state;
pub mod uffd;
pub mod vcpu;
pub mod vm;

/// Parses a size such as `4096`, `64M`, `1G` or `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size \"{s}\" (use e.g. 512M or 4G)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size \"{s}\" is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}

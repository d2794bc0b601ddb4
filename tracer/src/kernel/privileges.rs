//! The capabilities `tracer run` needs, checked before anything is loaded.

/// (bit, name) of each capability `run` needs when not root.
pub const REQUIRED: &[(u32, &str)] = &[
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
    (2, "CAP_DAC_READ_SEARCH"),
];

/// Names of the required capabilities missing from a `CapEff:` mask.
pub fn missing(cap_eff: u64) -> Vec<&'static str> {
    REQUIRED
        .iter()
        .filter(|(bit, _)| cap_eff & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// The effective capability mask of this process, from `/proc/self/status`.
pub fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert!(missing(u64::MAX).is_empty());
        assert_eq!(missing(0).len(), REQUIRED.len());
        let only_bpf = 1u64 << 39;
        assert!(!missing(only_bpf).contains(&"CAP_BPF"));
        assert!(missing(only_bpf).contains(&"CAP_PERFMON"));
    }
}

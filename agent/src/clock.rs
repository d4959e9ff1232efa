//! The boot clock, `CLOCK_BOOTTIME`: the clock of the kernel's event timestamps
//! (`bpf_ktime_get_boot_ns`) and of binding expiries. It counts across suspend and does not
//! jump with the wall clock. Every reading of it in the daemon goes through here.
//!
//! Also: durations as configuration files write them ([`duration_text`]).

/// Nanoseconds since boot (0 if the clock cannot be read, which Linux does not do).
pub fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
    })
}

/// Durations as humantime text (`1h`, `90s`) in configuration files.
pub mod duration_text {
    use serde::Deserialize as _;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration such as 1h or 15m: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_boot_clock_moves_forward() {
        let a = super::boot_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::boot_ns();
        assert!(a > 0 && b >= a + 2_000_000, "{a} {b}");
    }
}

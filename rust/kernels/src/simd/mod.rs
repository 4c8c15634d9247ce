//! Runtime SIMD dispatch. Nothing here is compiled with `target-cpu=native`: each fast path
//! is a `#[target_feature]` function chosen at run time from what the CPU reports, capped by
//! a level the user may force (tests force each level this machine has).
//!
//! The cap comes from `force()` or, on first use, from the `FASTATTN_SIMD` environment
//! variable (`scalar`, `avx2`, `avx512`, `neon`).

pub mod math;

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Level {
    /// Portable Rust, vectorised only as far as the baseline target allows.
    Scalar = 1,
    /// x86-64 AVX2 + FMA, 8 f32 lanes.
    Avx2 = 2,
    /// x86-64 AVX-512F, 16 f32 lanes.
    Avx512 = 3,
    /// aarch64 NEON, 4 f32 lanes.
    Neon = 4,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Neon => "neon",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" | "portable" => Some(Level::Scalar),
            "avx2" => Some(Level::Avx2),
            "avx512" | "avx512f" => Some(Level::Avx512),
            "neon" => Some(Level::Neon),
            _ => None,
        }
    }

    fn from_u8(x: u8) -> Option<Level> {
        match x {
            1 => Some(Level::Scalar),
            2 => Some(Level::Avx2),
            3 => Some(Level::Avx512),
            4 => Some(Level::Neon),
            _ => None,
        }
    }
}

/// Every level this CPU can run, lowest first.
pub fn available() -> Vec<Level> {
    let mut out = vec![Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            out.push(Level::Avx2);
            if is_x86_feature_detected!("avx512f") {
                out.push(Level::Avx512);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            out.push(Level::Neon);
        }
    }
    out
}

/// Whether this CPU can run `level`'s code. Cheap (cached feature bits), so safe entry
/// points that take a level re-check it instead of trusting the caller.
#[inline]
pub fn supported(level: Level) -> bool {
    match level {
        Level::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => is_x86_feature_detected!("avx512f"),
        #[cfg(target_arch = "aarch64")]
        Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    *available().last().expect("scalar is always available")
}

// 0 = not yet initialised from the environment.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The level kernels dispatch to now.
pub fn active() -> Level {
    if let Some(l) = Level::from_u8(ACTIVE.load(Ordering::Relaxed)) {
        return l;
    }
    let level = match std::env::var("FASTATTN_SIMD") {
        Ok(s) => match Level::parse(&s) {
            Some(l) if available().contains(&l) => l,
            // An unusable request falls back to the best level rather than aborting a
            // process at import; `force` is the checked way to choose.
            _ => detected(),
        },
        Err(_) => detected(),
    };
    // Only fill an unset level: a `force` that raced with this first read must win.
    match ACTIVE.compare_exchange(0, level as u8, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => level,
        Err(current) => Level::from_u8(current).unwrap_or(level),
    }
}

/// Forces kernels to dispatch to `level` (`None`: the best detected level).
pub fn force(level: Option<Level>) -> Result<Level, String> {
    let level = level.unwrap_or_else(detected);
    if !available().contains(&level) {
        return Err(format!(
            "SIMD level `{}` is not available on this CPU (available: {})",
            level.name(),
            available()
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    ACTIVE.store(level as u8, Ordering::Relaxed);
    Ok(level)
}

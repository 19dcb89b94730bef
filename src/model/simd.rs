//! Run-time CPU dispatch for the element-wise kernels (softmax, SwiGLU, RMSNorm, RoPE, the
//! chunked log-prob folds).
//!
//! grove builds for the baseline x86-64 target, so a loop over [`fast_exp`] compiles to 4-lane
//! SSE2 without FMA: the spike's attention softmax alone took 9 ms of an 80 ms forward pass.
//! `simd_kernel!` compiles one `#[inline(always)]` body three times (AVX-512, AVX2 + FMA, and
//! the baseline) and each call picks the widest the CPU has, detected once. Every helper such a
//! body calls must be `#[inline(always)]` too, so that it is compiled inside the wide copy.
//!
//! `GROVE_SIMD=avx2` or `GROVE_SIMD=baseline` caps the level (to compare, or to rule the wide
//! kernels out; `baseline` also turns off the fused linear layer's AVX2 decode path); a level
//! above what the CPU has is never used. The bf16 products read the same variable, with two
//! more values ([`Cap::NAMES`]): `avx512bf16` (no AMX tiles) and `amx` (no cap).
//!
//! [`fast_exp`]: super::fused::fast_exp
use std::sync::OnceLock;

/// Instruction-set levels, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

impl Level {
    /// Every level this CPU can run, narrowest first (tests compare them).
    pub fn available() -> Vec<Level> {
        [Level::Baseline, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|l| *l <= detected())
            .collect()
    }
}

/// The widest level the CPU supports.
pub fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq");
            if avx512 {
                return Level::Avx512;
            }
            if avx2 {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// What `GROVE_SIMD` allows, narrowest first: the element-wise kernels' [`Level`], and for the
/// bf16 products also whether `vdpbf16ps` (AVX-512-BF16) and AMX tiles may run
/// (`crate::model::bf16::kernel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cap {
    Baseline,
    Avx2,
    /// AVX-512 without the bf16 instructions (bf16 products widen to f32).
    Avx512,
    /// AVX-512 with `vdpbf16ps`, no AMX tiles.
    Avx512Bf16,
    /// Everything the CPU has (the default).
    Amx,
}

impl Cap {
    /// Every `GROVE_SIMD` value with its cap.
    pub const NAMES: [(&'static str, Cap); 5] = [
        ("baseline", Cap::Baseline),
        ("avx2", Cap::Avx2),
        ("avx512", Cap::Avx512),
        ("avx512bf16", Cap::Avx512Bf16),
        ("amx", Cap::Amx),
    ];

    /// The cap called `name` (None: not a known name).
    pub fn named(name: &str) -> Option<Cap> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }

    /// The widest element-wise level it allows.
    pub fn level(self) -> Level {
        match self {
            Cap::Baseline => Level::Baseline,
            Cap::Avx2 => Level::Avx2,
            Cap::Avx512 | Cap::Avx512Bf16 | Cap::Amx => Level::Avx512,
        }
    }
}

/// `GROVE_SIMD` read once: unset allows everything; an unknown value is reported on stderr
/// with the known ones and caps nothing (a kernel choice must not stop a run).
pub fn cap() -> Cap {
    static CAP: OnceLock<Cap> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("GROVE_SIMD") {
        Ok(name) => Cap::named(&name).unwrap_or_else(|| {
            let known: Vec<&str> = Cap::NAMES.iter().map(|(n, _)| *n).collect();
            eprintln!(
                "warning: GROVE_SIMD={name:?} is not one of {}; no cap applied",
                known.join(", ")
            );
            Cap::Amx
        }),
        Err(_) => Cap::Amx,
    })
}

/// The level kernels run at: [`detected`], capped by `GROVE_SIMD` when set.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| detected().min(cap().level()))
}

/// Defines `$name(args)`, which runs `$body` at [`level`], and `$at(level, args)`, which runs it
/// at the given level (capped at [`detected`], so any level is safe to ask for).
macro_rules! simd_kernel {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident / $at:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$meta])*
        #[inline]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $at($crate::model::simd::level(), $($arg),*)
        }

        #[allow(dead_code, clippy::too_many_arguments)]
        $vis fn $at(level: $crate::model::simd::Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match level.min($crate::model::simd::detected()) {
                    // SAFETY: `detected` reports these levels only when the CPU has the
                    // features the functions are compiled for.
                    $crate::model::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::model::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::model::simd::Level::Baseline => {}
                }
            }
            #[allow(unreachable_code)]
            body($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

#[cfg(test)]
mod tests {
    use super::*;

    simd_kernel! {
        fn scaled_sum / scaled_sum_at(x: &[f32], k: f32) -> f32 {
            x.iter().map(|v| v * k).sum()
        }
    }

    #[test]
    fn every_level_runs_and_agrees() {
        let x: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
        // Σ 0.5·i·2 for i < 100 = 4950.
        for l in Level::available() {
            assert_eq!(scaled_sum_at(l, &x, 2.0), 4950.0, "{l:?}");
        }
        assert_eq!(scaled_sum(&x, 2.0), 4950.0);
        assert!(Level::available().contains(&level()));
    }
}

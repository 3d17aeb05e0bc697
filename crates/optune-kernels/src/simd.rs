//! What the CPU kernels (fused and host) share: the instruction-set choice and `exp`.

use std::sync::OnceLock;

/// The widest instruction set the kernels can use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Defines `$vis fn $name` that runs `$kernel` compiled for the widest instruction set of
/// this CPU ([`isa`]): the same source, vectorised by the compiler for AVX-512 or AVX2+FMA.
macro_rules! with_widest_isa {
    ($vis:vis $name:ident$(<$t:ident: $bound:path>)? => $kernel:expr; ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $vis fn $name$(<$t: $bound>)?($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512$(<$t: $bound>)?($($arg: $ty),*) -> $ret {
                    $kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2$(<$t: $bound>)?($($arg: $ty),*) -> $ret {
                    $kernel($($arg),*)
                }
                match $crate::simd::isa() {
                    // SAFETY: the CPU has the features each function was compiled for.
                    $crate::simd::Isa::Avx512 => return unsafe { avx512$(::<$t>)?($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Isa::Avx2 => return unsafe { avx2$(::<$t>)?($($arg),*) },
                    $crate::simd::Isa::Portable => {}
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use with_widest_isa;

/// `e^x` in f32 within about 2 ulp (Cephes' `expf`: range reduction by ln 2 and a degree-5
/// polynomial), from plain arithmetic (no fused multiply-adds, so its value does not depend on
/// vectorisation or the instruction set). Exactly 0 below −87.3, where `e^x` leaves the normal
/// range: what a masked or far smaller logit contributes. Inputs above 88.3 saturate at e^88.3.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOW: f32 = -87.3;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer (ties to even) in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x < LOW { LOW } else { x };
    let clamped = if clamped > 88.3 { 88.3 } else { clamped };
    let n = (clamped * LOG2E + ROUND) - ROUND;
    let r = (clamped - n * C1) - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * (r * r) + r) + 1.0;
    // n is an integer in [-126, 127]: read it from the rounded sum's low mantissa bits.
    let n_int = (clamped * LOG2E + ROUND).to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < LOW {
        0.0
    } else {
        y * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_and_zero_below_the_normal_range() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = exp_f32(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4e-7, "relative error {worst:e}");
        assert_eq!(exp_f32(-1e30), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}

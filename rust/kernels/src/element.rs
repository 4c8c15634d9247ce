//! Storage types the kernels accept, and the accumulation type each computes in.
//!
//! fp32, bf16 and fp16 all accumulate in f32 (docs/conventions.md); f64 accumulates in f64. Kernels
//! convert to the accumulation type while packing tiles, so the hot loops only ever see
//! `Acc`.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Accumulation type: f32 or f64.
pub trait Acc:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::Neg<Output = Self>
    + Default
    + crate::gemm::GemmElem
    + crate::simd::math::VecMath
    + crate::buffer_pool::Poolable
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn is_finite(self) -> bool;
}

macro_rules! impl_acc {
    ($t:ty) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}
impl_acc!(f32);
impl_acc!(f64);

/// A storage element type of an input/output tensor.
pub trait Element: Copy + Send + Sync + 'static {
    type Acc: Acc;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(a: Self::Acc) -> Self;
    /// `dst[i] = src[i].to_acc()` over `min(len)` elements. Kernels convert whole rows
    /// through this so half types can use vector conversions (F16C) instead of one call
    /// per element.
    #[inline]
    fn to_acc_slice(src: &[Self], dst: &mut [Self::Acc]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_acc();
        }
    }
    /// The slice itself when the storage type already is the accumulation type (f32, f64),
    /// letting kernels read operands in place instead of converting a copy.
    #[inline]
    fn as_acc_slice(_s: &[Self]) -> Option<&[Self::Acc]> {
        None
    }
    /// `dst[i] = from_acc(src[i])` over `min(len)` elements.
    #[inline]
    fn from_acc_slice(src: &[Self::Acc], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_acc(s);
        }
    }
}

macro_rules! half_slices {
    () => {
        #[inline]
        fn to_acc_slice(src: &[Self], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            src[..n].convert_to_f32_slice(&mut dst[..n]);
        }
        #[inline]
        fn from_acc_slice(src: &[f32], dst: &mut [Self]) {
            let n = src.len().min(dst.len());
            dst[..n].convert_from_f32_slice(&src[..n]);
        }
    };
}

impl Element for f32 {
    type Acc = f32;
    #[inline]
    fn as_acc_slice(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        a
    }
}

impl Element for f64 {
    type Acc = f64;
    #[inline]
    fn as_acc_slice(s: &[f64]) -> Option<&[f64]> {
        Some(s)
    }
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f64) -> Self {
        a
    }
}

impl Element for bf16 {
    type Acc = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        bf16::from_f32(a)
    }
    half_slices!();
}

impl Element for f16 {
    type Acc = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        f16::from_f32(a)
    }
    half_slices!();
}

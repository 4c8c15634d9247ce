//! HiLo attention (LITv2, docs/hilo.md) at the attention boundary: the projections' outputs
//! in, the two branches' pre-projection outputs out, forward and backward.
//!
//! * Hi-Fi ([`hifi`]): attention inside non-overlapping `ws × ws` windows of the map, read
//!   straight from the channel-interleaved `[q | k | v]` projection output; windows past the
//!   bottom/right edge of a map whose sides are not multiples of `ws` use the caller's pad
//!   key/value (the projection of a zero token: its bias) for their missing tokens.
//! * Lo-Fi: every token's query against all pooled keys, on the dense attention kernel with
//!   its row layout reading the `[K | V]` halves of the pooled projection in place.
//!
//! Queries of pad tokens are never computed (LITv2 crops them after the projections), so the
//! outputs cover the map itself.

mod hifi;
mod lofi;
#[cfg(test)]
mod tests;

use crate::attention::{self, AttnDims, KvGrads, Layout, Rows};
use crate::element::Element;
use crate::error::{check_len, KernelError};
use crate::simd;

/// Shapes of one HiLo call. The map is `height × width` tokens per image; the pooled map has
/// `ceil(height/ws) · ceil(width/ws)` tokens. Both branches share `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiloDims {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub window: usize,
    pub head_dim: usize,
    pub hi_heads: usize,
    pub lo_heads: usize,
}

/// Token row strides (elements) of the inputs: `hi` of the `[q | k | v]` Hi-Fi projection
/// output (and of its gradient), `lo_q` of the Lo-Fi queries (and gradient), `lo_kv` of the
/// pooled `[K | V]` projection output (and gradient). Contiguous tensors have `3·h_dim`,
/// `l_dim` and `2·l_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiloRows {
    pub hi: usize,
    pub lo_q: usize,
    pub lo_kv: usize,
}

impl HiloDims {
    fn tokens(&self) -> usize {
        self.batch * self.height * self.width
    }
    /// Pooled tokens per image.
    pub fn pooled(&self) -> usize {
        self.height.div_ceil(self.window) * self.width.div_ceil(self.window)
    }
    fn hi_dim(&self) -> usize {
        self.hi_heads * self.head_dim
    }
    fn lo_dim(&self) -> usize {
        self.lo_heads * self.head_dim
    }
    fn geometry(&self, rows: &HiloRows) -> hifi::Geometry {
        hifi::Geometry {
            batch: self.batch,
            height: self.height,
            width: self.width,
            ws: self.window,
            heads: self.hi_heads,
            hd: self.head_dim,
            stride: rows.hi,
        }
    }
    fn lo_attn(&self) -> AttnDims {
        AttnDims {
            batch: self.batch,
            q_len: self.height * self.width,
            kv_len: self.pooled(),
            q_heads: self.lo_heads,
            kv_heads: self.lo_heads,
            head_dim: self.head_dim,
            v_head_dim: self.head_dim,
        }
    }
    fn lo_geometry(&self, rows: &HiloRows) -> lofi::Geometry {
        lofi::Geometry {
            batch: self.batch,
            q_len: self.height * self.width,
            keys: self.pooled(),
            heads: self.lo_heads,
            hd: self.head_dim,
            q_stride: rows.lo_q,
            kv_stride: rows.lo_kv,
        }
    }
    fn lo_layout(&self, rows: &HiloRows) -> Layout {
        Layout {
            q: Rows {
                offset: 0,
                stride: rows.lo_q,
            },
            k: Rows {
                offset: 0,
                stride: rows.lo_kv,
            },
            v: Rows {
                offset: self.lo_dim(),
                stride: rows.lo_kv,
            },
            o: Rows::dense(self.lo_heads, self.head_dim),
        }
    }
}

/// Largest window side: a window's scores are computed whole, `ws⁴` per head.
pub const MAX_WINDOW: usize = 8;

fn arg<T>(msg: String) -> Result<T, KernelError> {
    Err(KernelError::Argument(msg))
}

/// Checks a strided input of `rows` tokens with `width` channels at token stride `stride`.
fn check_rows<E>(
    name: &'static str,
    buf: &[E],
    rows: usize,
    width: usize,
    stride: usize,
) -> Result<(), KernelError> {
    if rows == 0 || width == 0 {
        return Ok(());
    }
    if stride < width {
        return arg(format!(
            "`{name}`: token stride {stride} is shorter than its {width} channels"
        ));
    }
    let need = (rows - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(width))
        .ok_or_else(|| KernelError::Argument(format!("`{name}` size overflows usize")))?;
    if buf.len() < need {
        return Err(KernelError::Length {
            name,
            expected: need,
            got: buf.len(),
        });
    }
    Ok(())
}

fn validate(d: &HiloDims) -> Result<(), KernelError> {
    if d.window == 0 || d.window > MAX_WINDOW {
        return arg(format!(
            "window size must be in 1..={MAX_WINDOW}, got {}",
            d.window
        ));
    }
    if d.head_dim == 0 && d.hi_heads + d.lo_heads > 0 {
        return arg("head_dim must be positive".into());
    }
    let sizes = [
        d.batch,
        d.height,
        d.width,
        d.head_dim,
        d.hi_heads + d.lo_heads,
        3,
    ];
    if sizes
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x.max(1)))
        .is_none()
    {
        return arg("HiLo sizes overflow usize".into());
    }
    Ok(())
}

/// Forward. `hi_qkv` `[B, H, W, ≥3·h_dim]` (token stride `rows.hi`), `hi_pad` the pad
/// token's `[k | v]` (`2·h_dim`; `None`: zeros), `lo_q` `[B, H, W, ≥l_dim]`, `lo_kv`
/// `[B, P, ≥2·l_dim]`; writes `hi_out` `[B, H, W, h_dim]`, `lo_out` `[B, H, W, l_dim]` and the
/// Lo-Fi log-sum-exp `lo_lse` `[B, H·W, l_heads]`. A branch without heads takes empty buffers.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Element>(
    d: &HiloDims,
    rows: &HiloRows,
    scale: f64,
    hi_qkv: &[E],
    hi_pad: Option<&[E]>,
    lo_q: &[E],
    lo_kv: &[E],
    hi_out: &mut [E],
    lo_out: &mut [E],
    lo_lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    validate(d)?;
    if !scale.is_finite() {
        return arg(format!("scale must be finite, got {scale}"));
    }
    let n = d.tokens();
    check_rows(
        "hi_qkv",
        hi_qkv,
        n * (d.hi_heads > 0) as usize,
        3 * d.hi_dim(),
        rows.hi,
    )?;
    if let Some(pad) = hi_pad {
        check_len("hi_pad", pad, 2 * d.hi_dim())?;
    }
    check_len("hi_out", hi_out, n * d.hi_dim())?;
    if d.hi_heads > 0 && n > 0 {
        hifi::forward(
            simd::active(),
            &d.geometry(rows),
            scale,
            hi_qkv,
            hi_pad,
            hi_out,
        );
    }
    if d.lo_heads > 0 {
        check_rows("lo_q", lo_q, n, d.lo_dim(), rows.lo_q)?;
        check_rows(
            "lo_kv",
            lo_kv,
            d.batch * d.pooled(),
            2 * d.lo_dim(),
            rows.lo_kv,
        )?;
        if d.pooled() <= lofi::MAX_KEYS {
            check_len("lo_out", lo_out, n * d.lo_dim())?;
            check_len("lo_lse", lo_lse, n * d.lo_heads)?;
            lofi::forward(
                simd::active(),
                &d.lo_geometry(rows),
                scale,
                lo_q,
                lo_kv,
                lo_out,
                lo_lse,
            );
            return Ok(());
        }
        attention::forward_with(
            &d.lo_attn(),
            &d.lo_layout(rows),
            scale,
            false,
            lo_q,
            lo_kv,
            lo_kv,
            lo_out,
            lo_lse,
        )?;
    } else {
        check_len("lo_out", lo_out, 0)?;
        check_len("lo_lse", lo_lse, 0)?;
    }
    Ok(())
}

/// Backward from the forward's `lo_out` / `lo_lse` and the outputs' gradients. Writes the
/// gradients of the inputs, addressed like them (only their channels are written), and of
/// the pad key/value (`d_hi_pad`, `2·h_dim`, or empty when no pad token exists or none was
/// given).
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element>(
    d: &HiloDims,
    rows: &HiloRows,
    scale: f64,
    hi_qkv: &[E],
    hi_pad: Option<&[E]>,
    lo_q: &[E],
    lo_kv: &[E],
    lo_out: &[E],
    lo_lse: &[E::Acc],
    d_hi_out: &[E],
    d_lo_out: &[E],
    d_hi_qkv: &mut [E],
    d_hi_pad: &mut [E],
    d_lo_q: &mut [E],
    d_lo_kv: &mut [E],
) -> Result<(), KernelError> {
    validate(d)?;
    if !scale.is_finite() {
        return arg(format!("scale must be finite, got {scale}"));
    }
    let n = d.tokens();
    if d.hi_heads > 0 && n > 0 {
        check_rows("hi_qkv", hi_qkv, n, 3 * d.hi_dim(), rows.hi)?;
        check_rows("d_hi_qkv", d_hi_qkv, n, 3 * d.hi_dim(), rows.hi)?;
        check_len("d_hi_out", d_hi_out, n * d.hi_dim())?;
        if let Some(pad) = hi_pad {
            check_len("hi_pad", pad, 2 * d.hi_dim())?;
            check_len("d_hi_pad", d_hi_pad, 2 * d.hi_dim())?;
        }
        let grad = hifi::backward(
            simd::active(),
            &d.geometry(rows),
            scale,
            hi_qkv,
            hi_pad,
            d_hi_out,
            d_hi_qkv,
        );
        if hi_pad.is_some() {
            E::from_acc_slice(&grad, d_hi_pad);
        }
    } else if hi_pad.is_some() {
        d_hi_pad.fill(E::from_acc(<E::Acc as crate::element::Acc>::ZERO));
    }
    if d.lo_heads > 0 {
        check_rows("lo_q", lo_q, n, d.lo_dim(), rows.lo_q)?;
        check_rows(
            "lo_kv",
            lo_kv,
            d.batch * d.pooled(),
            2 * d.lo_dim(),
            rows.lo_kv,
        )?;
        check_len("lo_out", lo_out, n * d.lo_dim())?;
        check_len("d_lo_out", d_lo_out, n * d.lo_dim())?;
        check_len("lo_lse", lo_lse, n * d.lo_heads)?;
        check_rows("d_lo_q", d_lo_q, n, d.lo_dim(), rows.lo_q)?;
        check_rows(
            "d_lo_kv",
            d_lo_kv,
            d.batch * d.pooled(),
            2 * d.lo_dim(),
            rows.lo_kv,
        )?;
        if d.pooled() <= lofi::MAX_KEYS {
            lofi::backward(
                simd::active(),
                &d.lo_geometry(rows),
                scale,
                lo_q,
                lo_kv,
                lo_out,
                d_lo_out,
                lo_lse,
                d_lo_q,
                d_lo_kv,
            );
            return Ok(());
        }
        attention::backward_with(
            &d.lo_attn(),
            &d.lo_layout(rows),
            scale,
            false,
            lo_q,
            lo_kv,
            lo_kv,
            lo_out,
            d_lo_out,
            lo_lse,
            d_lo_q,
            KvGrads::Joint(d_lo_kv),
        )?;
    }
    Ok(())
}

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
use crate::element::{Acc, Element};
use crate::error::{check_len, KernelError};
use crate::linear::SharedMut;
use crate::simd;

/// Where a branch reads its query rows and writes its output rows: apart, or the output
/// over the queries ([`forward_in_place`]: inference, where nothing needs the queries
/// after, and no fresh output buffer means no page faults on tens of MiB per call).
/// Every read and write goes through `row` / `out_row` on exactly the cells of one
/// (token, head) or token: the tasks of a call own disjoint cells, so no task reads a cell
/// another one writes.
#[derive(Clone, Copy)]
pub(super) struct Io<E> {
    src: *const E,
    /// Elements readable at `src` when the queries are apart (read-only then).
    src_len: usize,
    out: SharedMut<E>,
    pub out_stride: usize,
    pub in_place: bool,
}

// SAFETY: see the type's docs: disjoint cells per task.
unsafe impl<E: Send> Send for Io<E> {}
unsafe impl<E: Send> Sync for Io<E> {}

impl<E> Io<E> {
    fn apart(q: &[E], out: &mut [E], out_stride: usize) -> Self {
        Io {
            src: q.as_ptr(),
            src_len: q.len(),
            out: SharedMut(out.as_mut_ptr()),
            out_stride,
            in_place: false,
        }
    }
    fn in_place(qo: &mut [E], out_stride: usize) -> Self {
        Io {
            src: qo.as_ptr(),
            src_len: 0,
            out: SharedMut(qo.as_mut_ptr()),
            out_stride,
            in_place: true,
        }
    }
    /// The whole query buffer, when it is apart from the output.
    pub fn queries(&self) -> Option<&[E]> {
        // SAFETY: apart queries are a live shared slice nobody writes during the call.
        (!self.in_place).then(|| unsafe { std::slice::from_raw_parts(self.src, self.src_len) })
    }
    /// # Safety
    /// `off..off + len` in bounds and not written by any other task during the call.
    pub unsafe fn row<'a>(&self, off: usize, len: usize) -> &'a [E] {
        std::slice::from_raw_parts(self.src.add(off), len)
    }
    /// # Safety
    /// `off..off + len` in bounds and owned by the calling task.
    pub unsafe fn out_row<'a>(&self, off: usize, len: usize) -> &'a mut [E] {
        std::slice::from_raw_parts_mut(self.out.0.add(off), len)
    }
    pub fn out_ptr(&self) -> *mut E {
        self.out.0
    }
}

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
    check_call(d, rows, scale, hi_qkv)?;
    let n = d.tokens();
    check_len("hi_out", hi_out, n * d.hi_dim())?;
    if d.lo_heads > 0 {
        check_rows("lo_q", lo_q, n, d.lo_dim(), rows.lo_q)?;
        check_len("lo_out", lo_out, n * d.lo_dim())?;
    } else {
        check_len("lo_out", lo_out, 0)?;
    }
    let hi = Io::apart(hi_qkv, hi_out, d.hi_dim());
    if d.lo_heads > 0 && d.pooled() > lofi::MAX_KEYS {
        return run_dense(d, rows, scale, hi, hi_pad, lo_q, lo_kv, lo_out, lo_lse);
    }
    let lo = Io::apart(lo_q, lo_out, d.lo_dim());
    run_branches(d, rows, scale, hi, hi_pad, lo, lo_kv, lo_lse)
}

/// Inference forward that writes each branch's output over its queries: the Hi-Fi output
/// into the q channels of `hi_qkv` (token stride `rows.hi`), the Lo-Fi output into `lo_q`,
/// which must be dense (`rows.lo_q == l_dim`). Same numbers as [`forward`]; the inputs are
/// consumed.
#[allow(clippy::too_many_arguments)]
pub fn forward_in_place<E: Element>(
    d: &HiloDims,
    rows: &HiloRows,
    scale: f64,
    hi_qkv: &mut [E],
    hi_pad: Option<&[E]>,
    lo_q: &mut [E],
    lo_kv: &[E],
    lo_lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    check_call(d, rows, scale, hi_qkv)?;
    let n = d.tokens();
    if d.lo_heads > 0 {
        if rows.lo_q != d.lo_dim() {
            return arg(format!(
                "in-place Lo-Fi needs dense queries (row stride {}), got {}",
                d.lo_dim(),
                rows.lo_q
            ));
        }
        check_rows("lo_q", lo_q, n, d.lo_dim(), rows.lo_q)?;
    }
    let hi = Io::in_place(hi_qkv, rows.hi);
    if d.lo_heads > 0 && d.pooled() > lofi::MAX_KEYS {
        // The dense kernel reads its queries while other tiles are written: it gets an
        // output of its own, copied over the queries after (large maps are compute-bound).
        let mut out = vec![E::from_acc(E::Acc::ZERO); n * d.lo_dim()];
        run_dense(d, rows, scale, hi, hi_pad, lo_q, lo_kv, &mut out, lo_lse)?;
        lo_q[..out.len()].copy_from_slice(&out);
        return Ok(());
    }
    let lo = Io::in_place(lo_q, d.lo_dim());
    run_branches(d, rows, scale, hi, hi_pad, lo, lo_kv, lo_lse)
}

/// Checks shared by both forwards: dims, scale and the Hi-Fi rows.
fn check_call<E>(
    d: &HiloDims,
    rows: &HiloRows,
    scale: f64,
    hi_qkv: &[E],
) -> Result<(), KernelError> {
    validate(d)?;
    if !scale.is_finite() {
        return arg(format!("scale must be finite, got {scale}"));
    }
    check_rows(
        "hi_qkv",
        hi_qkv,
        d.tokens() * (d.hi_heads > 0) as usize,
        3 * d.hi_dim(),
        rows.hi,
    )
}

/// Hi-Fi, then Lo-Fi on the dense kernel (`pooled > lofi::MAX_KEYS`).
#[allow(clippy::too_many_arguments)]
fn run_dense<E: Element>(
    d: &HiloDims,
    rows: &HiloRows,
    scale: f64,
    hi: Io<E>,
    hi_pad: Option<&[E]>,
    lo_q: &[E],
    lo_kv: &[E],
    lo_out: &mut [E],
    lo_lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    check_kv_lse(d, rows, lo_kv, lo_lse)?;
    run_hifi(d, rows, scale, hi, hi_pad)?;
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
    )
}

fn check_kv_lse<E: Element>(
    d: &HiloDims,
    rows: &HiloRows,
    lo_kv: &[E],
    lo_lse: &[E::Acc],
) -> Result<(), KernelError> {
    if d.lo_heads > 0 {
        check_rows(
            "lo_kv",
            lo_kv,
            d.batch * d.pooled(),
            2 * d.lo_dim(),
            rows.lo_kv,
        )?;
        check_len("lo_lse", lo_lse, d.tokens() * d.lo_heads)
    } else {
        check_len("lo_lse", lo_lse, 0)
    }
}

fn run_hifi<E: Element>(
    d: &HiloDims,
    rows: &HiloRows,
    scale: f64,
    hi: Io<E>,
    hi_pad: Option<&[E]>,
) -> Result<(), KernelError> {
    if let Some(pad) = hi_pad {
        check_len("hi_pad", pad, 2 * d.hi_dim())?;
    }
    if d.hi_heads > 0 && d.tokens() > 0 {
        hifi::forward(simd::active(), &d.geometry(rows), scale, hi, hi_pad);
    }
    Ok(())
}

/// Hi-Fi, then Lo-Fi on its small-map kernel (`pooled ≤ lofi::MAX_KEYS`).
#[allow(clippy::too_many_arguments)]
fn run_branches<E: Element>(
    d: &HiloDims,
    rows: &HiloRows,
    scale: f64,
    hi: Io<E>,
    hi_pad: Option<&[E]>,
    lo: Io<E>,
    lo_kv: &[E],
    lo_lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    check_kv_lse(d, rows, lo_kv, lo_lse)?;
    run_hifi(d, rows, scale, hi, hi_pad)?;
    if d.lo_heads > 0 {
        lofi::forward(
            simd::active(),
            &d.lo_geometry(rows),
            scale,
            lo,
            lo_kv,
            lo_lse,
        );
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

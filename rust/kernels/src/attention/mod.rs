//! Dense softmax attention (flash-style), forward and backward.
//!
//! Tiled like FlashAttention-2 on the CPU: per head, K and V are packed once into GEMM
//! panels; each query tile computes `S = Q·Kᵀ` one key tile at a time into an L1/L2-sized
//! buffer, exponentiates it in place with an online (running max/sum) softmax and
//! accumulates `P·V`. No `T × T` matrix is ever stored; the backward pass recomputes `P`
//! from the saved log-sum-exp. Scores live in base 2 (`scale·log2 e` is folded into Q).

mod backward;
mod forward;
mod forward_few;
mod layout;

pub use layout::{KvGrads, Layout, Rows};

use crate::element::Element;
use crate::error::{check_len, KernelError};

// Tile sizes. Query tiles are multiples of every micro-kernel's MR so tiles stay full; key
// tiles are multiples of `gemm::NR` so they start on panel boundaries.
/// Forward keys per tile.
const FWD_BK: usize = 256;
/// Forward query rows per tile: taller tiles stream K/V less often, which pays once a
/// head's K/V outgrow L2; shorter ones waste less on causal diagonal tiles.
fn fwd_bq(q_len: usize) -> usize {
    if q_len >= 4096 {
        128
    } else {
        64
    }
}
/// Backward query rows per tile.
const BWD_BQ: usize = 128;
/// Backward keys per tile.
const BWD_BK: usize = 128;

/// A raw pointer tasks write disjoint elements through (heads-last layouts interleave the
/// rows of different tasks, so the output cannot be split into slices).
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every user writes only the elements of its own task (see the call sites).
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    #[inline(always)]
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Writes `scale · src` as storage elements at `dst[offset..offset + src.len()]`, converting
/// the whole row at once (`tmp` is reused scratch).
///
/// # Safety
/// That range of `dst` must be valid and written by no one else meanwhile.
unsafe fn store_row<E: Element>(
    dst: SharedMut<E>,
    offset: usize,
    src: &[E::Acc],
    scale: E::Acc,
    tmp: &mut Vec<E::Acc>,
) {
    let out = std::slice::from_raw_parts_mut(dst.get().add(offset), src.len());
    if scale == <E::Acc as crate::element::Acc>::ONE {
        E::from_acc_slice(src, out);
    } else {
        tmp.clear();
        tmp.extend(src.iter().map(|&x| x * scale));
        E::from_acc_slice(tmp, out);
    }
}

/// Which keys query `i` sees: keys `j` with `j < limit(i)`.
#[derive(Clone, Copy)]
struct Visibility {
    causal: bool,
    /// `kv_len - q_len`: causal aligns queries to the end of the keys.
    offset: isize,
    kv_len: usize,
}

impl Visibility {
    fn new(dims: &AttnDims, causal: bool) -> Self {
        Visibility {
            causal,
            offset: dims.kv_len as isize - dims.q_len as isize,
            kv_len: dims.kv_len,
        }
    }
    /// Number of leading keys query `i` attends to.
    #[inline]
    fn limit(&self, i: usize) -> usize {
        if self.causal {
            (i as isize + self.offset + 1).clamp(0, self.kv_len as isize) as usize
        } else {
            self.kv_len
        }
    }
    /// First query that sees key `j`.
    #[inline]
    fn first_query(&self, j: usize) -> usize {
        if self.causal {
            (j as isize - self.offset).max(0) as usize
        } else {
            0
        }
    }
}

fn mul(name: &'static str, xs: &[usize]) -> Result<usize, KernelError> {
    xs.iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or_else(|| KernelError::Argument(format!("`{name}` size overflows usize")))
}

/// Checks the head grouping (lengths are checked by the callers).
fn validate(dims: &AttnDims) -> Result<(), KernelError> {
    if dims.q_heads > 0 && (dims.kv_heads == 0 || !dims.q_heads.is_multiple_of(dims.kv_heads)) {
        return Err(KernelError::Argument(format!(
            "q_heads ({}) must be a multiple of kv_heads ({})",
            dims.q_heads, dims.kv_heads
        )));
    }
    Ok(())
}

struct Lens {
    q: usize,
    kv: usize,
    v: usize,
    o: usize,
    lse: usize,
}

fn lens(d: &AttnDims) -> Result<Lens, KernelError> {
    Ok(Lens {
        q: mul("q", &[d.batch, d.q_len, d.q_heads, d.head_dim])?,
        kv: mul("k", &[d.batch, d.kv_len, d.kv_heads, d.head_dim])?,
        v: mul("v", &[d.batch, d.kv_len, d.kv_heads, d.v_head_dim])?,
        o: mul("out", &[d.batch, d.q_len, d.q_heads, d.v_head_dim])?,
        lse: mul("lse", &[d.batch, d.q_len, d.q_heads])?,
    })
}

/// Shapes of one dense attention call. Every buffer is contiguous heads-last:
/// q `[batch, q_len, q_heads, head_dim]`, k `[batch, kv_len, kv_heads, head_dim]`,
/// v `[batch, kv_len, kv_heads, v_head_dim]`, out/dout `[batch, q_len, q_heads, v_head_dim]`,
/// lse `[batch, q_len, q_heads]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

/// Forward: writes `out` and the natural-log `lse`. `causal` aligns queries to the end of the
/// keys (flash-attn): query `i` sees key `j` iff `j <= i + kv_len - q_len`. A query that sees
/// no key gets output 0 and lse -inf.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Element>(
    dims: &AttnDims,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
    lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    validate(dims)?;
    let n = lens(dims)?;
    check_len("q", q, n.q)?;
    check_len("k", k, n.kv)?;
    check_len("v", v, n.v)?;
    check_len("out", out, n.o)?;
    forward_with(dims, &Layout::dense(dims), scale, causal, q, k, v, out, lse)
}

/// [`forward`] with operands addressed by `layout` (k and v may be the same buffer).
#[allow(clippy::too_many_arguments)]
pub fn forward_with<E: Element>(
    dims: &AttnDims,
    layout: &Layout,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &mut [E],
    lse: &mut [E::Acc],
) -> Result<(), KernelError> {
    validate(dims)?;
    let n = lens(dims)?;
    layout.check_q(dims, "q", q.len())?;
    layout.check_k(dims, "k", k.len())?;
    layout.check_v(dims, "v", v.len())?;
    layout.check_o(dims, "out", out.len())?;
    check_len("lse", lse, n.lse)?;
    if n.lse == 0 {
        return Ok(());
    }
    match (E::as_acc_slice(k), E::as_acc_slice(v)) {
        (Some(k), Some(v)) if forward_few::applies(dims) => {
            forward_few::run(dims, layout, scale, causal, q, k, v, out, lse)
        }
        _ => forward::run(dims, layout, scale, causal, q, k, v, out, lse),
    }
    Ok(())
}

/// Backward from the saved `out` and `lse`. Writes (overwrites) dq, dk, dv.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element>(
    dims: &AttnDims,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dq: &mut [E],
    dk: &mut [E],
    dv: &mut [E],
) -> Result<(), KernelError> {
    validate(dims)?;
    let n = lens(dims)?;
    check_len("q", q, n.q)?;
    check_len("k", k, n.kv)?;
    check_len("v", v, n.v)?;
    check_len("out", out, n.o)?;
    check_len("dout", dout, n.o)?;
    check_len("dq", dq, n.q)?;
    check_len("dk", dk, n.kv)?;
    check_len("dv", dv, n.v)?;
    let layout = Layout::dense(dims);
    backward_with(
        dims,
        &layout,
        scale,
        causal,
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        KvGrads::Split { dk, dv },
    )
}

/// [`backward`] with operands and gradients addressed by `layout`: dq like q, dk like k, dv
/// like v, dout like out. Only the addressed elements of the gradient buffers are written.
#[allow(clippy::too_many_arguments)]
pub fn backward_with<E: Element>(
    dims: &AttnDims,
    layout: &Layout,
    scale: f64,
    causal: bool,
    q: &[E],
    k: &[E],
    v: &[E],
    out: &[E],
    dout: &[E],
    lse: &[E::Acc],
    dq: &mut [E],
    dkv: KvGrads<'_, E>,
) -> Result<(), KernelError> {
    validate(dims)?;
    let n = lens(dims)?;
    layout.check_q(dims, "q", q.len())?;
    layout.check_k(dims, "k", k.len())?;
    layout.check_v(dims, "v", v.len())?;
    layout.check_o(dims, "out", out.len())?;
    layout.check_o(dims, "dout", dout.len())?;
    check_len("lse", lse, n.lse)?;
    layout.check_q(dims, "dq", dq.len())?;
    let (dkp, dvp) = match dkv {
        KvGrads::Split { dk, dv } => {
            layout.check_k(dims, "dk", dk.len())?;
            layout.check_v(dims, "dv", dv.len())?;
            (SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()))
        }
        KvGrads::Joint(dkv) => {
            layout.check_k(dims, "dkv", dkv.len())?;
            layout.check_v(dims, "dkv", dkv.len())?;
            if !layout.kv_disjoint(dims) {
                return Err(KernelError::Argument(
                    "dk and dv share a buffer but their rows overlap".into(),
                ));
            }
            let p = SharedMut(dkv.as_mut_ptr());
            (p, p)
        }
    };
    let dqp = SharedMut(dq.as_mut_ptr());
    if n.lse == 0 || dims.kv_len == 0 {
        let zero = E::from_acc(<E::Acc as crate::element::Acc>::ZERO);
        // SAFETY: the checks above keep every addressed row inside its buffer, and nothing
        // else runs on these buffers during the call.
        unsafe {
            fill_rows(
                dqp,
                layout.q,
                dims.batch * dims.q_len,
                dims.q_heads,
                dims.head_dim,
                zero,
            );
            fill_rows(
                dkp,
                layout.k,
                dims.batch * dims.kv_len,
                dims.kv_heads,
                dims.head_dim,
                zero,
            );
            fill_rows(
                dvp,
                layout.v,
                dims.batch * dims.kv_len,
                dims.kv_heads,
                dims.v_head_dim,
                zero,
            );
        }
        return Ok(());
    }
    backward::run(
        dims, layout, scale, causal, q, k, v, out, dout, lse, dqp, dkp, dvp,
    );
    Ok(())
}

/// Sets every addressed element of `rows` token rows to `x`.
///
/// # Safety
/// Every addressed row must lie inside the buffer behind `p`, written by no one else.
unsafe fn fill_rows<E: Copy>(
    p: SharedMut<E>,
    r: Rows,
    rows: usize,
    heads: usize,
    width: usize,
    x: E,
) {
    for bt in 0..rows {
        std::slice::from_raw_parts_mut(p.get().add(r.at(bt, 0, width)), heads * width).fill(x);
    }
}

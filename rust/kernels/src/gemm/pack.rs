//! Packers that turn a strided matrix of storage elements into the panel layouts the GEMM
//! reads, converting to the accumulation type (and optionally scaling) on the way so the
//! hot loops only ever see `Acc`.
//!
//! Source matrices are addressed as `src[base + r * rs + c]` (unit column stride), which
//! covers one head of a heads-last tensor.

use super::{panels, round_up_nr, NR};
use crate::element::{Acc, Element};

/// A strided view of a matrix in a larger buffer.
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub base: usize,
    pub rs: usize,
    pub rows: usize,
    pub cols: usize,
}

/// `dst = scale · row`, converted to the accumulation type a whole row at a time.
#[inline]
fn convert_row<E: Element>(row: &[E], scale: E::Acc, dst: &mut [E::Acc]) {
    E::to_acc_slice(row, dst);
    if scale != E::Acc::ONE {
        dst.iter_mut().for_each(|x| *x *= scale);
    }
}

/// Packs `Xᵀ` as a GEMM `B`: panels over X's rows, `out[p][c][jj] = scale·X[p·NR+jj][c]`,
/// zero past the last row. Panel stride: `cols · NR`. (K → Kᵀ panels for `Q·Kᵀ`.)
pub fn pack_transposed<E: Element>(src: &[E], v: View, scale: E::Acc, out: &mut Vec<E::Acc>) {
    let np = panels(v.rows);
    out.clear();
    if v.cols == 0 {
        return;
    }
    out.reserve(np * v.cols * NR);
    let mut tmp = vec![E::Acc::ZERO; v.cols];
    // One panel at a time, zeroed then filled while it sits in L1: contiguous reads,
    // strided writes, and no separate pass over the whole (possibly fresh) buffer.
    for p in 0..np {
        let start = out.len();
        out.resize(start + v.cols * NR, E::Acc::ZERO);
        let panel = &mut out[start..];
        let r0 = p * NR;
        for jj in 0..NR.min(v.rows - r0) {
            convert_row(&src[v.base + (r0 + jj) * v.rs..][..v.cols], scale, &mut tmp);
            for (d, &x) in panel[jj..].iter_mut().step_by(NR).zip(&tmp) {
                *d = x;
            }
        }
    }
}

/// Packs `X` as a GEMM `B`: panels over X's columns, `out[p][r][cc] = scale·X[r][p·NR+cc]`,
/// rows padded to a multiple of NR, zero past the last column. Panel stride:
/// `round_up_nr(rows) · NR`, returned.
pub fn pack_cols<E: Element>(src: &[E], v: View, scale: E::Acc, out: &mut Vec<E::Acc>) -> usize {
    let np = panels(v.cols);
    let rows_pad = round_up_nr(v.rows);
    out.clear();
    out.resize(np * rows_pad * NR, E::Acc::ZERO);
    for p in 0..np {
        let c0 = p * NR;
        let nc = NR.min(v.cols - c0);
        let panel = &mut out[p * rows_pad * NR..];
        for r in 0..v.rows {
            convert_row(
                &src[v.base + r * v.rs + c0..][..nc],
                scale,
                &mut panel[r * NR..][..nc],
            );
        }
    }
    rows_pad * NR
}

/// Copies `X` into a contiguous row-major `[rows][cols]` buffer (a GEMM `A`).
pub fn pack_rows<E: Element>(src: &[E], v: View, scale: E::Acc, out: &mut Vec<E::Acc>) {
    out.clear();
    out.resize(v.rows * v.cols, E::Acc::ZERO);
    if v.cols == 0 {
        return;
    }
    for (r, dst) in out.chunks_exact_mut(v.cols).enumerate() {
        convert_row(&src[v.base + r * v.rs..][..v.cols], scale, dst);
    }
}

/// A matrix of `rows × cols` accumulation values read as a GEMM `A` operand: in place when
/// the storage type is the accumulation type, else converted into `tmp`. Returns the slice
/// starting at the view's first element and its row stride.
pub fn rows_of<'a, E: Element>(
    src: &'a [E],
    v: View,
    tmp: &'a mut Vec<E::Acc>,
) -> (&'a [E::Acc], usize) {
    match E::as_acc_slice(src) {
        Some(s) => (&s[v.base..], v.rs),
        None => {
            pack_rows(src, v, E::Acc::ONE, tmp);
            (&tmp[..], v.cols)
        }
    }
}

//! bf16 matrix products for the linear layers: C (m, n) = A·B (or C += A·B) with A and B in
//! bf16, f32 accumulation and an f32 result. An f32 operand is rounded to bf16 once per call
//! (round to nearest, ties to even), which is what PyTorch's autocast does to a matmul's inputs.
//!
//! Three kernels, the fastest the CPU has chosen once ([`detected`]), `GROVE_SIMD` able to
//! force each lower one ([`kernel`]):
//! - [`Bf16Kernel::Amx`]: Intel AMX tiles (`tdpbf16ps`, Sapphire Rapids and later), in
//!   [`crate::model::amx`]: 16 × 16 f32 tiles of C from 16 × 32 bf16 tiles, 8192
//!   multiply-adds per instruction.
//! - [`Bf16Kernel::Avx512Bf16`]: `vdpbf16ps` (Cooper Lake, Sapphire Rapids, AMD Zen 4 and
//!   later): each 32-bit lane multiplies a pair of bf16 values along k and adds both products
//!   to its f32 accumulator. A 12 × 32 tile of C lives in 24 registers while k runs.
//! - [`Bf16Kernel::Widen`] (AVX2 machines such as Zen 3, or `GROVE_SIMD` capped below
//!   `avx512bf16`): both bf16 operands widened to f32 (exact: a bf16 is the high half of an f32)
//!   and the f32 GEMM, so every path sees the same numbers and they differ only in the order of
//!   the f32 sums. The bf16 instructions treat denormal inputs as zero; bf16 shares f32's
//!   exponent range, so that concerns values below 1.2e-38 only.
//!
//! Both native kernels read the same packed operands: B in panels of 32 columns whose k-pairs
//! are interleaved (what `vdpbf16ps` multiplies against a broadcast pair of A, and AMX's
//! "VNNI" B tile), k padded to a multiple of 32; A rounded into a row-major bf16 copy. A
//! weight's packed panels are made once per bf16 working copy ([`WeightPacks`]), not per
//! product. Few rows (decoding: one token per sequence) take row-by-row dot products instead,
//! reading each weight row once without packing.
use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::amx::{self, SharedOut};
use crate::model::fused::{gemm_acc, output_buffer};

/// `model.dtype`: the precision of the model's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Dtype {
    /// Every product in f32: the reference.
    #[default]
    F32,
    /// Products on bf16 values with f32 accumulation (PyTorch's autocast to bf16).
    Bf16,
}

impl Dtype {
    /// Every dtype with its name in configs and on the command line.
    pub const ALL: [(&'static str, Dtype); 2] = [("f32", Dtype::F32), ("bf16", Dtype::Bf16)];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, d)| *d == self)
            .map_or("?", |(n, _)| n)
    }

    /// The dtype called `name`; an unknown one is an error listing the known ones.
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown dtype {name:?}: expected one of {}",
                    known.join(", ")
                )
            })
    }
}

impl TryFrom<String> for Dtype {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        Dtype::from_name(&name)
    }
}

impl From<Dtype> for String {
    fn from(d: Dtype) -> String {
        d.name().into()
    }
}

/// One operand of [`gemm_bf16`]: f32 values (rounded to bf16 when read) or bf16 ones.
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Operand<'_> {
    fn len(&self) -> usize {
        match self {
            Operand::F32(v) => v.len(),
            Operand::Bf16(v) => v.len(),
        }
    }

    /// Element `i` as bf16 bits.
    #[inline(always)]
    fn bits(&self, i: usize) -> u16 {
        match self {
            Operand::F32(v) => round_bf16(v[i]),
            Operand::Bf16(v) => v[i].to_bits(),
        }
    }
}

/// f32 → bf16 bits, rounding to nearest with ties to even (a NaN stays a quiet NaN). The
/// carry of the rounding increment runs into the exponent, so the largest finite values round
/// up to infinity, as IEEE rounding does.
#[inline(always)]
pub fn round_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn widen_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// An f32 slice rounded to bf16 (in parallel for large slices).
pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    out.par_chunks_mut(1 << 16)
        .zip(v.par_chunks(1 << 16))
        .for_each(|(o, s)| {
            for (o, &x) in o.iter_mut().zip(s) {
                *o = bf16::from_bits(round_bf16(x));
            }
        });
    out
}

/// A bf16 slice widened to f32 (in parallel for large slices).
pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    // Written in full below.
    let mut out = output_buffer(v.len());
    out.par_chunks_mut(1 << 16)
        .zip(v.par_chunks(1 << 16))
        .for_each(|(o, s)| {
            for (o, &x) in o.iter_mut().zip(s) {
                *o = widen_bf16(x.to_bits());
            }
        });
    out
}

/// The implementations of [`gemm_bf16`], slowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bf16Kernel {
    /// Widen to f32 and run the f32 GEMM: every machine.
    Widen,
    /// `vdpbf16ps` (AVX-512-BF16).
    Avx512Bf16,
    /// `tdpbf16ps` on AMX tiles (AMX-BF16), with the AVX-512-BF16 dot products for few rows.
    Amx,
}

impl Bf16Kernel {
    /// Every kernel this CPU can run (tests compare them).
    pub fn available() -> Vec<Bf16Kernel> {
        [Bf16Kernel::Widen, Bf16Kernel::Avx512Bf16, Bf16Kernel::Amx]
            .into_iter()
            .filter(|k| *k <= detected())
            .collect()
    }
}

/// The fastest kernel the CPU (and, for AMX, the OS) allows.
pub fn detected() -> Bf16Kernel {
    static DETECTED: OnceLock<Bf16Kernel> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
        {
            // AMX leaves few-row products to `vdpbf16ps`, so it needs AVX-512-BF16 as well.
            return if amx::available() {
                Bf16Kernel::Amx
            } else {
                Bf16Kernel::Avx512Bf16
            };
        }
        Bf16Kernel::Widen
    })
}

/// The kernel products run on: [`detected`], capped by `GROVE_SIMD`
/// ([`crate::model::simd::Cap`]): `amx` or unset allows all, `avx512bf16` rules out AMX,
/// `avx512`, `avx2` and `baseline` leave the f32 fallback.
pub fn kernel() -> Bf16Kernel {
    use crate::model::simd::{cap, Cap};
    let cap = match cap() {
        Cap::Amx => Bf16Kernel::Amx,
        Cap::Avx512Bf16 => Bf16Kernel::Avx512Bf16,
        Cap::Avx512 | Cap::Avx2 | Cap::Baseline => Bf16Kernel::Widen,
    };
    detected().min(cap)
}

/// C (m, n) = A·B, or C += A·B with `accumulate`, at [`kernel`]. A is (m, k) and B (k, n), each
/// addressed through (row stride, column stride) as in the f32 `gemm_acc`, so transposed
/// operands (wᵀ for the forward, gᵀ for ∂w) need no copy by the caller. C is row-major.
/// Returns the kernel that ran.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    c: &mut [f32],
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    a_strides: (usize, usize),
    b: Operand,
    b_strides: (usize, usize),
) -> Bf16Kernel {
    gemm_bf16_at(kernel(), c, accumulate, m, n, k, a, a_strides, b, b_strides)
}

/// [`gemm_bf16`] on a given kernel, capped at [`detected`] (one the CPU lacks runs the next
/// one down). Returns the kernel that ran: few rows against a bf16 weight read along k take
/// the AVX-512-BF16 dot products also when AMX was asked for.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_at(
    kernel: Bf16Kernel,
    c: &mut [f32],
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    a_strides: (usize, usize),
    b: Operand,
    b_strides: (usize, usize),
) -> Bf16Kernel {
    let product = Product {
        m,
        n,
        k,
        a,
        a_strides,
        b,
        b_strides,
    };
    run(kernel, c, accumulate, &product, None)
}

/// [`gemm_bf16_at`] with B a weight whose packed panels are kept in `packed` (made there on
/// the first product that needs them, reused after). `packed` must belong to this B and
/// layout (a product of another shape panics).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_cached(
    kernel: Bf16Kernel,
    c: &mut [f32],
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    a_strides: (usize, usize),
    b: Operand,
    b_strides: (usize, usize),
    packed: &OnceLock<PackedB>,
) -> Bf16Kernel {
    let product = Product {
        m,
        n,
        k,
        a,
        a_strides,
        b,
        b_strides,
    };
    run(kernel, c, accumulate, &product, Some(packed))
}

/// One product's operands: A (m, k) and B (k, n) with their (row, column) strides.
#[derive(Clone, Copy)]
struct Product<'a> {
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'a>,
    a_strides: (usize, usize),
    b: Operand<'a>,
    b_strides: (usize, usize),
}

/// B (k, n) packed for the native kernels: panels of NR = 32 columns, `kp` k-pairs each (k
/// padded with zeros to a multiple of [`amx::K_STEP`]), pair q of panel p at `(p·kp + q)·2·NR`.
pub struct PackedB {
    data: Vec<u16>,
    k: usize,
    n: usize,
    kp: usize,
}

impl PackedB {
    /// B (k, n) read through (row, column) strides.
    pub fn new(b: Operand, strides: (usize, usize), k: usize, n: usize) -> Self {
        let kp = padded_pairs(k);
        PackedB {
            data: pack_b(b, strides, k, n, kp),
            k,
            n,
            kp,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// The packed forms of one bf16 weight w (out, in), each made on first use: `t` for the
/// forward x·wᵀ (B = wᵀ), `dx` for the backward g·w (B = w). Dropped with the working copy
/// they were made from.
#[derive(Default)]
pub struct WeightPacks {
    pub t: OnceLock<PackedB>,
    pub dx: OnceLock<PackedB>,
}

/// k-pairs of the packed operands: k rounded up to a whole AMX tile step (32 values).
fn padded_pairs(k: usize) -> usize {
    k.div_ceil(amx::K_STEP) * amx::K_STEP / 2
}

/// Runs `p` on `kernel` capped at [`detected`]; returns the kernel that ran.
fn run(
    kernel: Bf16Kernel,
    c: &mut [f32],
    accumulate: bool,
    p: &Product,
    packed: Option<&OnceLock<PackedB>>,
) -> Bf16Kernel {
    let Product {
        m,
        n,
        k,
        a,
        a_strides,
        b,
        b_strides,
    } = *p;
    assert!(c.len() >= m * n, "gemm_bf16: C holds {} < {m}×{n}", c.len());
    let kernel = kernel.min(detected());
    if m == 0 || n == 0 {
        return kernel;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return kernel;
    }
    let reach =
        |(rs, cs): (usize, usize), rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(a.len() > reach(a_strides, m, k), "gemm_bf16: A too short");
    assert!(b.len() > reach(b_strides, k, n), "gemm_bf16: B too short");
    if kernel == Bf16Kernel::Widen {
        widen_gemm(c, accumulate, m, n, k, a, a_strides, b, b_strides);
        return kernel;
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 kernel {kernel:?} on a CPU other than x86-64");
    #[cfg(target_arch = "x86_64")]
    native(kernel, c, accumulate, p, packed)
}

/// [`run`] on a native kernel (AVX-512-BF16 or AMX, which the CPU has).
#[cfg(target_arch = "x86_64")]
fn native(
    kernel: Bf16Kernel,
    c: &mut [f32],
    accumulate: bool,
    p: &Product,
    packed: Option<&OnceLock<PackedB>>,
) -> Bf16Kernel {
    let Product {
        m,
        n,
        k,
        a,
        a_strides,
        b,
        b_strides,
    } = *p;
    let kp = padded_pairs(k);
    if m <= SKINNY_ROWS && b_strides.0 == 1 {
        if let Operand::Bf16(bv) = b {
            let ap = pack_a(a, a_strides, m, m, k, 2 * kp);
            skinny(c, accumulate, m, n, 2 * kp, &ap, bv, k, b_strides.1);
            return Bf16Kernel::Avx512Bf16;
        }
    }
    let here;
    let bp = match packed {
        Some(cell) => cell.get_or_init(|| PackedB::new(b, b_strides, k, n)),
        None => {
            here = PackedB::new(b, b_strides, k, n);
            &here
        }
    };
    assert!(
        (bp.k, bp.n, bp.kp) == (k, n, kp),
        "gemm_bf16: packed B is {}×{}, the product needs {k}×{n}",
        bp.k,
        bp.n
    );
    if kernel == Bf16Kernel::Amx {
        // AMX reads whole 32-row blocks of A: the rows past m are zeros.
        let ap = pack_a(
            a,
            a_strides,
            m,
            m.div_ceil(amx::BLOCK) * amx::BLOCK,
            k,
            2 * kp,
        );
        amx::gemm(c, accumulate, m, n, kp, &ap, &bp.data);
    } else {
        let ap = pack_a(a, a_strides, m, m, k, 2 * kp);
        blocked(c, accumulate, m, n, kp, &ap, &bp.data);
    }
    kernel
}

/// The fallback: both operands as f32 (rounded through bf16), then the f32 GEMM.
#[allow(clippy::too_many_arguments)]
fn widen_gemm(
    c: &mut [f32],
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    (a_rs, a_cs): (usize, usize),
    b: Operand,
    (b_rs, b_cs): (usize, usize),
) {
    let dense = |o: Operand, rs: usize, cs: usize, rows: usize, cols: usize| -> Vec<f32> {
        // Written in full: one value per (row, column).
        let mut out = output_buffer(rows * cols);
        out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                *v = widen_bf16(o.bits(r * rs + j * cs));
            }
        });
        out
    };
    let (ad, bd) = (dense(a, a_rs, a_cs, m, k), dense(b, b_rs, b_cs, k, n));
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    gemm_acc(c, accumulate, m, n, k, &ad, (k, 1), &bd, (n, 1), par);
}

/// Columns of C per panel: two 16-lane registers.
const NR: usize = 32;
/// Rows of C per register tile: 2·MR accumulators and the two B registers fit the 32 zmm.
const MR: usize = 12;
/// k-pairs per block: a panel's slice is 32 KiB and stays in L1 while a task's row tiles run.
const KC: usize = 256;
/// Rows and columns of C per parallel task (NC a multiple of NR).
const MC: usize = 96;
const NC: usize = 8 * NR;
/// Up to this many rows, and with B a weight read along k, dot products replace the GEMM.
const SKINNY_ROWS: usize = 16;

/// A (m, k) as row-major bf16 bits in `rows` ≥ m rows of `ka` values, zero past k and past m.
fn pack_a(
    a: Operand,
    (rs, cs): (usize, usize),
    m: usize,
    rows: usize,
    k: usize,
    ka: usize,
) -> Vec<u16> {
    let mut out = vec![0u16; rows * ka];
    out.par_chunks_mut(ka)
        .take(m)
        .enumerate()
        .for_each(|(i, row)| {
            for (kk, v) in row[..k].iter_mut().enumerate() {
                *v = a.bits(i * rs + kk * cs);
            }
        });
    out
}

/// B (k, n) as panels of NR columns and `kp` ≥ k/2 pairs: panel p, pair q holds
/// (B[2q][j], B[2q+1][j]) for its columns j side by side, zero past n and past k.
fn pack_b(b: Operand, (rs, cs): (usize, usize), k: usize, n: usize, kp: usize) -> Vec<u16> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0u16; panels * kp * 2 * NR];
    out.par_chunks_mut(kp * 2 * NR)
        .enumerate()
        .for_each(|(p, panel)| {
            let width = NR.min(n - p * NR);
            // Walk B along its contiguous dimension: a column at a time when its rows are
            // adjacent (B = wᵀ, the forward), a row at a time otherwise (B = w, ∂x), so every
            // read of a large weight is sequential rather than one cache line per value.
            if rs <= cs {
                for l in 0..width {
                    let j = p * NR + l;
                    for kk in 0..k {
                        panel[(kk / 2) * 2 * NR + l * 2 + kk % 2] = b.bits(kk * rs + j * cs);
                    }
                }
            } else {
                for kk in 0..k {
                    let dst = &mut panel[(kk / 2) * 2 * NR + kk % 2..];
                    for l in 0..width {
                        dst[l * 2] = b.bits(kk * rs + (p * NR + l) * cs);
                    }
                }
            }
        });
    out
}

/// The blocked GEMM over packed A (m, 2·kp) and B panels.
#[cfg(target_arch = "x86_64")]
fn blocked(c: &mut [f32], accumulate: bool, m: usize, n: usize, kp: usize, a: &[u16], b: &[u16]) {
    let lda = 2 * kp;
    let (mt, nt) = (m.div_ceil(MC), n.div_ceil(NC));
    let out = SharedOut(c.as_mut_ptr());
    (0..mt * nt).into_par_iter().for_each(|t| {
        let (i0, j0) = (t / nt * MC, t % nt * NC);
        let (i1, j1) = ((i0 + MC).min(m), (j0 + NC).min(n));
        for q0 in (0..kp).step_by(KC) {
            let pairs = KC.min(kp - q0);
            let load_c = accumulate || q0 > 0;
            for p in j0 / NR..j1.div_ceil(NR) {
                let cols = NR.min(n - p * NR);
                let bp = &b[(p * kp + q0) * 2 * NR..][..pairs * 2 * NR];
                let mut i = i0;
                while i < i1 {
                    let rows = MR.min(i1 - i);
                    let ap = &a[i * lda + 2 * q0..];
                    debug_assert!(ap.len() >= (rows - 1) * lda + 2 * pairs);
                    // SAFETY: the CPU has AVX-512-BF16 (the caller checked `detected`); A's
                    // rows i..i+rows hold pairs·2 values from 2·q0, the panel slice holds
                    // `pairs` pairs of NR lanes, and the tile (rows × cols at (i, p·NR)) lies
                    // inside C's m × n, written by this task only.
                    unsafe {
                        tile_dispatch(
                            rows,
                            ap.as_ptr(),
                            lda,
                            bp.as_ptr(),
                            pairs,
                            out.ptr().add(i * n + p * NR),
                            n,
                            cols,
                            load_c,
                        )
                    };
                    i += rows;
                }
            }
        }
    });
}

/// Runs `tile::<rows>` (rows in 1..=MR).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_dispatch(
    rows: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    load_c: bool,
) {
    macro_rules! go {
        ($($r:literal)*) => {
            match rows {
                $($r => tile::<$r>(a, lda, b, pairs, c, ldc, cols, load_c),)*
                _ => unreachable!("tile rows {rows} outside 1..={MR}"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8 9 10 11 12)
}

/// Lanes `0..n` of a 16-lane mask (n ≤ 16).
#[inline(always)]
fn lanes(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// C[0..R][0..cols] (+)= A[0..R] · panel over `pairs` k-pairs, R × 32 accumulators in registers.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512-BF16; `a` holds R rows of stride `lda` with 2·pairs values
/// each, `b` holds pairs × 32 interleaved pairs, and C's rows (stride `ldc`) have `cols` writable
/// floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    a: *const u16,
    lda: usize,
    b: *const u16,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    load_c: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for q in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * 64).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * 64 + 32).cast()));
        for (i, acc) in acc.iter_mut().enumerate() {
            let pair = a.add(i * lda + 2 * q).cast::<i32>().read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
    for (i, acc) in acc.iter().enumerate() {
        let row = c.add(i * ldc);
        // Past `cols` the masks are empty: nothing is read or written there.
        let row_hi = row.wrapping_add(16);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if load_c {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row_hi));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row_hi, m1, v1);
    }
}

/// Few rows of A (packed, stride `ka`) against B = wᵀ with w's rows contiguous (row j of w at
/// j·w_stride, k values): every row of w is read once and dotted with each row of A.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn skinny(
    c: &mut [f32],
    accumulate: bool,
    m: usize,
    n: usize,
    ka: usize,
    a: &[u16],
    w: &[bf16],
    k: usize,
    w_stride: usize,
) {
    let out = SharedOut(c.as_mut_ptr());
    let block = (16384 / k.max(1)).max(8);
    (0..n.div_ceil(block)).into_par_iter().for_each(|t| {
        for j in t * block..((t + 1) * block).min(n) {
            let wj = &w[j * w_stride..][..k];
            let mut sums = [0f32; SKINNY_ROWS];
            // SAFETY: the CPU has AVX-512-BF16 (checked by the caller); A holds m ≤ 16 rows
            // of ka ≥ k values and wj k values.
            unsafe { dots(a, ka, m, wj, &mut sums) };
            for (i, s) in sums[..m].iter().enumerate() {
                // SAFETY: (i, j) lies in C's m × n; column j belongs to this task only.
                unsafe {
                    let p = out.ptr().add(i * n + j);
                    *p = if accumulate { *p + s } else { *s };
                }
            }
        }
    });
}

/// sums[i] = A[i] · w for the m ≤ 16 rows of A (stride ka), w of k bf16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dots(a: &[u16], ka: usize, m: usize, w: &[bf16], sums: &mut [f32; SKINNY_ROWS]) {
    use std::arch::x86_64::*;
    let k = w.len();
    let mut acc = [_mm512_setzero_ps(); SKINNY_ROWS];
    let wp = w.as_ptr().cast::<u16>();
    let mut kk = 0;
    while kk < k {
        let mask: __mmask32 = if k - kk >= 32 {
            u32::MAX
        } else {
            (1u32 << (k - kk)) - 1
        };
        let wv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, wp.add(kk).cast()));
        for (i, acc) in acc[..m].iter_mut().enumerate() {
            let xv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                mask,
                a.as_ptr().add(i * ka + kk).cast(),
            ));
            *acc = _mm512_dpbf16_ps(*acc, xv, wv);
        }
        kk += 32;
    }
    for (s, acc) in sums[..m].iter_mut().zip(&acc) {
        *s = _mm512_reduce_add_ps(*acc);
    }
}

#[cfg(test)]
#[path = "bf16_model_tests.rs"]
mod model_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rounding_is_to_nearest_even_like_the_half_crate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut values: Vec<f32> = (0..20000)
            .map(|_| f32::from_bits(rng.gen::<u32>()))
            .collect();
        values.extend([
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            // Ties: 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷ and rounds to the even 1;
            // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶ and rounds up.
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
        ]);
        for v in values {
            let ours = round_bf16(v);
            let theirs = bf16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(widen_bf16(ours).is_nan(), "{v:?}");
            } else {
                assert_eq!(ours, theirs, "{v:e} ({:#x})", v.to_bits());
            }
        }
        assert_eq!(round_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(round_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(round_bf16(f32::MAX), 0x7F80);
    }

    /// The three products of a linear layer, as (name, A strides, B strides) for A (m, k) and
    /// B (k, n) stored as the layer stores them: y = x·wᵀ reads w (n, k) through strides,
    /// ∂x = g·w reads w (k, n) row-major, ∂w = gᵀ·x reads g (k, m) through strides.
    type Layout = (&'static str, (usize, usize), (usize, usize));

    fn layouts(m: usize, k: usize, n: usize) -> [Layout; 3] {
        [
            ("x·wᵀ", (k, 1), (1, k)),
            ("g·w", (k, 1), (n, 1)),
            ("gᵀ·x", (1, m), (n, 1)),
        ]
    }

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    /// Exact (f64) C = A·B + C0 and Σ|a||b| per element, from the given (already rounded)
    /// values.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        (ars, acs): (usize, usize),
        b: &[f64],
        (brs, bcs): (usize, usize),
        c0: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut c, mut mag) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut t) = (c0[i * n + j] as f64, c0[i * n + j].abs() as f64);
                for kk in 0..k {
                    let p = a[i * ars + kk * acs] * b[kk * brs + j * bcs];
                    s += p;
                    t += p.abs();
                }
                c[i * n + j] = s;
                mag[i * n + j] = t;
            }
        }
        (c, mag)
    }

    /// Every kernel (AMX where the CPU has it), every layout, awkward shapes (m = 1, 3, 17, 20,
    /// 33 and past a task's 96 rows, none a multiple of AMX's 32-row blocks; k = 1, odd, not a
    /// multiple of 32, and past a 512-value block; n past a 256-column task and not a multiple
    /// of 32), with and without accumulation, against two bounds:
    ///
    /// - against the exact product of the unrounded f32 inputs: bf16 keeps 8 significant bits,
    ///   so rounding to nearest has relative error ≤ 2⁻⁸ (half of the 2⁻⁷ spacing above 1; a
    ///   2⁻⁹ bound would need 9 bits). With a and b both rounded, each product is off by at
    ///   most ((1 + 2⁻⁸)² − 1)·|a·b| < 1.004·2⁻⁷·|a·b|, and the f32 accumulation of the k
    ///   products and C's old value adds ≤ (k + 48)·2⁻²⁴·Σ|a·b| (48 covers the pairwise lanes
    ///   and the 16-lane reductions);
    /// - against the exact product of the bf16-rounded inputs: products of two 8-bit
    ///   significands are exact in f32, so only the accumulation error remains.
    #[test]
    fn every_kernel_matches_the_exact_product_within_bf16_rounding() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let shapes = [
            (1, 7, 5),
            (3, 33, 70),
            (17, 100, 33),
            (16, 64, 40),
            (5, 1, 3),
            (20, 1, 33),
            (33, 65, 47),
            (100, 1100, 300),
        ];
        for kernel in Bf16Kernel::available() {
            for &(m, k, n) in &shapes {
                for (what, a_st, b_st) in layouts(m, k, n) {
                    for accumulate in [false, true] {
                        let a = random(m * k, &mut rng);
                        let b = random(k * n, &mut rng);
                        let c0 = if accumulate {
                            random(m * n, &mut rng)
                        } else {
                            vec![0f32; m * n]
                        };
                        // B as the layer keeps a weight: bf16. A as activations: f32.
                        let bb = to_bf16(&b);
                        let mut c = c0.clone();
                        if !accumulate {
                            c.fill(f32::NAN);
                        }
                        gemm_bf16_at(
                            kernel,
                            &mut c,
                            accumulate,
                            m,
                            n,
                            k,
                            Operand::F32(&a),
                            a_st,
                            Operand::Bf16(&bb),
                            b_st,
                        );
                        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
                        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                        let (exact, mag) = reference(m, n, k, &a64, a_st, &b64, b_st, &c0);
                        let ar: Vec<f64> = a
                            .iter()
                            .map(|&v| widen_bf16(round_bf16(v)) as f64)
                            .collect();
                        let br: Vec<f64> = to_f32(&bb).iter().map(|&v| v as f64).collect();
                        let (exact_r, _) = reference(m, n, k, &ar, a_st, &br, b_st, &c0);
                        let acc_err = (k + 48) as f64 * 2f64.powi(-24);
                        for idx in 0..m * n {
                            let got = c[idx] as f64;
                            let tol = (1.004 * 2f64.powi(-7) + acc_err) * mag[idx];
                            assert!(
                                (got - exact[idx]).abs() <= tol,
                                "{kernel:?} {what} m={m} k={k} n={n} acc={accumulate} [{idx}]: \
                                 {got} vs {} (tolerance {tol:e})",
                                exact[idx]
                            );
                            let tol_r = acc_err * mag[idx] + 1e-30;
                            assert!(
                                (got - exact_r[idx]).abs() <= tol_r,
                                "{kernel:?} {what} m={m} k={k} n={n} acc={accumulate} [{idx}]: \
                                 {got} vs rounded-input {} (tolerance {tol_r:e})",
                                exact_r[idx]
                            );
                        }
                    }
                }
            }
        }
    }

    /// The fallback forced against the fast path on the same inputs (both operands f32 and
    /// both bf16): equal up to the order of the f32 sums. On a CPU without AVX-512-BF16 only
    /// the fallback runs, and the test above checks it.
    #[test]
    fn the_fallback_agrees_with_the_fast_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (m, k, n) = (37, 200, 45);
        let a = random(m * k, &mut rng);
        let b = random(k * n, &mut rng);
        let (ab, bb) = (to_bf16(&a), to_bf16(&b));
        let run = |kernel, a: Operand, b: Operand| {
            let mut c = vec![0f32; m * n];
            gemm_bf16_at(kernel, &mut c, false, m, n, k, a, (k, 1), b, (1, k));
            c
        };
        for kernel in Bf16Kernel::available() {
            let from_f32 = run(kernel, Operand::F32(&a), Operand::F32(&b));
            let from_bf16 = run(kernel, Operand::Bf16(&ab), Operand::Bf16(&bb));
            // Rounding inside the call or before it gives the same bf16 inputs.
            assert_eq!(from_f32, from_bf16, "{kernel:?}");
            let widened = run(Bf16Kernel::Widen, Operand::Bf16(&ab), Operand::Bf16(&bb));
            for (x, y) in from_f32.iter().zip(&widened) {
                // Σ|a·b| ≤ k·4 here; accumulation error ≤ 2·(k + 48)·2⁻²⁴ of it.
                let tol = 2.0 * (k + 48) as f32 * 2f32.powi(-24) * 4.0 * k as f32;
                assert!((x - y).abs() <= tol, "{kernel:?}: {x} vs {y}");
            }
        }
        assert!(Bf16Kernel::available().contains(&kernel()));
    }

    /// Each kernel the CPU has really runs when asked for: the call reports it, and an AMX
    /// product adds to the count of AMX blocks (so a silent fallback fails). Few rows against
    /// a weight take the dot products, whatever was asked.
    #[test]
    fn the_kernel_asked_for_is_the_kernel_that_runs() {
        let (m, k, n) = (40, 70, 50);
        let a = vec![0.5f32; m * k];
        let w = to_bf16(&vec![0.25f32; n * k]);
        for kernel in Bf16Kernel::available() {
            let before = amx::blocks_run();
            let mut c = vec![0f32; m * n];
            let ran = gemm_bf16_at(
                kernel,
                &mut c,
                false,
                m,
                n,
                k,
                Operand::F32(&a),
                (k, 1),
                Operand::Bf16(&w),
                (1, k),
            );
            assert_eq!(ran, kernel);
            assert!(c.iter().all(|&v| v == 0.125 * k as f32), "{kernel:?}");
            // 40 × 50 is 2 × 2 blocks of 32; other tests may add blocks meanwhile.
            if kernel == Bf16Kernel::Amx {
                assert!(amx::blocks_run() >= before + 4);
            }
            let mut c = vec![0f32; 3 * n];
            let ran = gemm_bf16_at(
                kernel,
                &mut c,
                false,
                3,
                n,
                k,
                Operand::F32(&a),
                (k, 1),
                Operand::Bf16(&w),
                (1, k),
            );
            let few = kernel.min(Bf16Kernel::Avx512Bf16);
            assert_eq!(ran, few);
        }
        // Asking for more than the CPU has runs the best it has.
        let mut c = vec![0f32; m * n];
        let ran = gemm_bf16_at(
            Bf16Kernel::Amx,
            &mut c,
            false,
            m,
            n,
            k,
            Operand::F32(&a),
            (k, 1),
            Operand::Bf16(&w),
            (1, k),
        );
        assert_eq!(ran, detected());
    }

    /// The detected kernel follows the CPU's flags as Linux lists them in /proc/cpuinfo (an
    /// independent reading of CPUID): AMX tiles (and the permission to use them) where
    /// `amx_bf16` and `amx_tile` are listed, `vdpbf16ps` where `avx512_bf16` is.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn detection_follows_the_cpu_flags() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags: Vec<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap()
            .split_whitespace()
            .collect();
        let has = |f: &str| flags.contains(&f);
        let bf16 = has("avx512_bf16") && has("avx512f") && has("avx512bw");
        let expected = if bf16 && has("amx_bf16") && has("amx_tile") {
            Bf16Kernel::Amx
        } else if bf16 {
            Bf16Kernel::Avx512Bf16
        } else {
            Bf16Kernel::Widen
        };
        assert_eq!(detected(), expected, "flags: {flags:?}");
        assert_eq!(amx::cpu_has_amx_bf16(), has("amx_bf16") && has("amx_tile"));
    }

    /// A weight's packed panels, kept between products, give the same result as packing per
    /// product, are made once, and are refused for a product of another shape.
    #[test]
    fn kept_panels_give_the_same_products() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (m, k, n) = (45, 90, 70);
        let x = random(m * k, &mut rng);
        let w = to_bf16(&random(n * k, &mut rng));
        let packs = WeightPacks::default();
        let product = |cache: Option<&OnceLock<PackedB>>| {
            let mut y = vec![0f32; m * n];
            let (a, b) = (Operand::F32(&x), Operand::Bf16(&w));
            match cache {
                Some(p) => {
                    gemm_bf16_cached(kernel(), &mut y, false, m, n, k, a, (k, 1), b, (1, k), p)
                }
                None => gemm_bf16(&mut y, false, m, n, k, a, (k, 1), b, (1, k)),
            };
            y
        };
        let fresh = product(None);
        assert_eq!(product(Some(&packs.t)), fresh);
        let made = packs.t.get().map(|p| p.data.as_ptr());
        assert_eq!(product(Some(&packs.t)), fresh);
        if kernel() != Bf16Kernel::Widen {
            assert!(made.is_some());
            assert_eq!(packs.t.get().map(|p| p.data.as_ptr()), made, "packed again");
            let wrong = std::panic::catch_unwind(|| {
                let mut y = vec![0f32; m * k];
                let (a, b) = (Operand::F32(&x), Operand::Bf16(&w));
                gemm_bf16_cached(
                    kernel(),
                    &mut y,
                    false,
                    m,
                    k,
                    n,
                    a,
                    (k, 1),
                    b,
                    (k, 1),
                    &packs.t,
                );
            });
            assert!(wrong.is_err(), "panels of another shape were used");
        }
    }

    #[test]
    fn an_empty_k_zeroes_or_keeps_c() {
        for kernel in Bf16Kernel::available() {
            let mut c = vec![5f32; 6];
            gemm_bf16_at(
                kernel,
                &mut c,
                false,
                2,
                3,
                0,
                Operand::F32(&[]),
                (0, 1),
                Operand::F32(&[]),
                (3, 1),
            );
            assert_eq!(c, vec![0f32; 6]);
            let mut c = vec![5f32; 6];
            gemm_bf16_at(
                kernel,
                &mut c,
                true,
                2,
                3,
                0,
                Operand::F32(&[]),
                (0, 1),
                Operand::F32(&[]),
                (3, 1),
            );
            assert_eq!(c, vec![5f32; 6]);
        }
    }
}

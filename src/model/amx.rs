//! bf16 matrix products on Intel AMX tiles (Sapphire Rapids and later): `tdpbf16ps` multiplies
//! a 16 × 32 bf16 tile of A by a 16 × 16-column tile of k-pair-interleaved B into a 16 × 16 f32
//! tile of C, 8192 multiply-adds per instruction (an AVX-512 `vdpbf16ps` does 32).
//!
//! The AMX intrinsics are unstable in Rust, so the few instructions run through `asm!`. Linux
//! keeps the 8 KiB tile registers out of a thread's saved state until the process asks for
//! them once (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without that a tile
//! instruction raises SIGILL, so [`available`] asks, and says no when the kernel refuses.
//!
//! The kernel computes 32 × 32 blocks of C in four tile registers (tmm0–3) while k runs to its
//! end inside the block: per 32 values of k it loads two A tiles (tmm4–5) and two B tiles
//! (tmm6–7) and issues four `tdpbf16ps`. The operands come packed by [`crate::model::bf16`]:
//! A row-major with rows padded to a multiple of 32 and k to a multiple of 32 (zeros), B in
//! 32-column panels of interleaved k-pairs (the layout the AVX-512-BF16 kernel reads, a
//! multiple of 16 pairs long), so a B tile is 16 pair-rows of 64 bytes at a 128-byte stride.
//! Each block is stored to a small f32 buffer and merged into C, which handles the edges of C
//! and accumulation; every element of C is summed in one fixed order, whatever the threads.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows of an A or C tile; also the k-pairs of a B tile.
const TILE_ROWS: usize = 16;
/// bf16 values of k per tile step (16 pairs).
pub const K_STEP: usize = 32;
/// Rows and columns of C per block: 2 × 2 tiles.
pub const BLOCK: usize = 32;
/// Rows and columns of C per parallel task (multiples of BLOCK): a task's A rows and B panel
/// stay in the core's L2 while its blocks run.
const TASK_ROWS: usize = 128;
const TASK_COLS: usize = 256;

/// How many blocks the AMX kernel has computed in this process (tests check that the AMX path
/// really ran rather than a fallback).
static BLOCKS: AtomicU64 = AtomicU64::new(0);

/// Blocks computed on AMX tiles so far.
pub fn blocks_run() -> u64 {
    BLOCKS.load(Ordering::Relaxed)
}

/// Whether this CPU has AMX-BF16 and the OS lets this process use the tiles (asked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            cpu_has_amx_bf16() && request_tile_state()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
#[cfg(target_arch = "x86_64")]
pub fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID exists on every x86-64 CPU; leaf 7 is read only when leaf 0 lists it.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state (XFEATURE_XTILEDATA = 18): true when granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and touches no memory of
    // ours; an old kernel answers EINVAL, which we treat as "no AMX".
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

/// The 64-byte tile configuration (palette 1): all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette 1
        for t in 0..8 {
            // bytes per row (u16 little-endian at 16 + 2t), rows (u8 at 48 + t)
            cfg[16 + 2 * t] = 64;
            cfg[48 + t] = TILE_ROWS as u8;
        }
        TileConfig(cfg)
    }
}

/// A raw pointer to C shared by parallel tasks that write disjoint parts of it (here and in
/// the AVX-512-BF16 kernels).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every user has each task write a part of C that no other task touches.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so closures capture the whole Sync wrapper, not its field).
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// C (m, n) = A·B, or C += A·B with `accumulate`, on AMX tiles. `a` is A packed row-major with
/// `2·kp` values per row and at least m rounded up to 32 rows; `b` is B in panels of 32
/// columns, `kp` pairs each (panel p, pair q at `(p·kp + q)·64`). `kp` is a multiple of 16.
///
/// Panics when [`available`] is false or the buffers are shorter than that.
pub fn gemm(c: &mut [f32], accumulate: bool, m: usize, n: usize, kp: usize, a: &[u16], b: &[u16]) {
    assert!(available(), "amx::gemm on a CPU or OS without AMX");
    assert!(
        kp.is_multiple_of(TILE_ROWS) && kp > 0,
        "amx::gemm: kp = {kp}"
    );
    assert!(c.len() >= m * n, "amx::gemm: C holds {} < {m}×{n}", c.len());
    assert!(
        a.len() >= m.div_ceil(BLOCK) * BLOCK * 2 * kp,
        "amx::gemm: A too short"
    );
    assert!(
        b.len() >= n.div_ceil(BLOCK) * kp * 2 * BLOCK,
        "amx::gemm: B too short"
    );
    let (mt, nt) = (m.div_ceil(TASK_ROWS), n.div_ceil(TASK_COLS));
    let out = SharedOut(c.as_mut_ptr());
    (0..mt * nt).into_par_iter().for_each(|t| {
        let (i0, j0) = (t / nt * TASK_ROWS, t % nt * TASK_COLS);
        let (i1, j1) = ((i0 + TASK_ROWS).min(m), (j0 + TASK_COLS).min(n));
        let cfg = TileConfig::all_full();
        let mut block = [0f32; BLOCK * BLOCK];
        // SAFETY: `available` granted the tile state; the configuration is 64 aligned bytes.
        unsafe { load_config(&cfg) };
        for p in j0 / BLOCK..j1.div_ceil(BLOCK) {
            let panel = &b[p * kp * 2 * BLOCK..][..kp * 2 * BLOCK];
            for i in (i0..i1).step_by(BLOCK) {
                let rows = &a[i * 2 * kp..][..BLOCK * 2 * kp];
                // SAFETY: tiles configured above; `rows` holds 32 rows of 2·kp values and
                // `panel` kp pairs of 32 columns, kp a multiple of 16 (checked above).
                unsafe { block_product(rows, panel, kp, &mut block) };
                let (r, w) = (BLOCK.min(m - i), BLOCK.min(n - p * BLOCK));
                for (ri, brow) in block.chunks_exact(BLOCK).take(r).enumerate() {
                    // SAFETY: row i + ri < m and columns p·32 .. p·32 + w ≤ n lie in this
                    // task's rectangle of C, written by this task only.
                    let crow = unsafe {
                        std::slice::from_raw_parts_mut(out.ptr().add((i + ri) * n + p * BLOCK), w)
                    };
                    if accumulate {
                        crow.iter_mut().zip(brow).for_each(|(c, v)| *c += v);
                    } else {
                        crow.copy_from_slice(&brow[..w]);
                    }
                }
                BLOCKS.fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: releases this thread's tile state (configured above).
        unsafe { release() };
    });
}

/// `ldtilecfg`.
///
/// # Safety
/// The process holds the tile state ([`available`]).
unsafe fn load_config(cfg: &TileConfig) {
    #[cfg(target_arch = "x86_64")]
    std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
}

/// `tilerelease`.
///
/// # Safety
/// As [`load_config`].
unsafe fn release() {
    #[cfg(target_arch = "x86_64")]
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// out (32 × 32, row-major) = A rows (32 × 2·kp) · B panel (kp pairs × 32 columns).
///
/// # Safety
/// Tiles configured by [`load_config`]; `a` holds 32 rows of 2·kp bf16 values, `b` kp pairs of
/// 32 columns; kp a multiple of 16.
unsafe fn block_product(a: &[u16], b: &[u16], kp: usize, out: &mut [f32; BLOCK * BLOCK]) {
    debug_assert!(a.len() >= BLOCK * 2 * kp && b.len() >= kp * 2 * BLOCK);
    #[cfg(target_arch = "x86_64")]
    {
        let a_stride = 2 * kp * 2; // bytes per row of A
        let b_stride = 2 * BLOCK * 2; // bytes per pair-row of the panel
        let a_hi = a.as_ptr().add(TILE_ROWS * 2 * kp);
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for q0 in (0..kp).step_by(TILE_ROWS) {
            // A: rows 0–15 and 16–31 at k = 2·q0; B: columns 0–15 and 16–31 of pairs q0…q0+15.
            std::arch::asm!(
                "tileloadd tmm4, [{a_lo} + {sa}*1]",
                "tileloadd tmm5, [{a_hi} + {sa}*1]",
                "tileloadd tmm6, [{b_lo} + {sb}*1]",
                "tileloadd tmm7, [{b_hi} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a_lo = in(reg) a.as_ptr().add(2 * q0),
                a_hi = in(reg) a_hi.add(2 * q0),
                b_lo = in(reg) b.as_ptr().add(q0 * 2 * BLOCK),
                b_hi = in(reg) b.as_ptr().add(q0 * 2 * BLOCK + TILE_ROWS * 2),
                sa = in(reg) a_stride,
                sb = in(reg) b_stride,
                options(nostack, readonly)
            );
        }
        let o = out.as_mut_ptr();
        let half = TILE_ROWS * BLOCK; // the second 16 rows
        std::arch::asm!(
            "tilestored [{c00} + {s}*1], tmm0",
            "tilestored [{c01} + {s}*1], tmm1",
            "tilestored [{c10} + {s}*1], tmm2",
            "tilestored [{c11} + {s}*1], tmm3",
            c00 = in(reg) o,
            c01 = in(reg) o.add(TILE_ROWS),
            c10 = in(reg) o.add(half),
            c11 = in(reg) o.add(half + TILE_ROWS),
            s = in(reg) BLOCK * 4,
            options(nostack)
        );
    }
}

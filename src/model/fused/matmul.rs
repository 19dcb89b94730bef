//! GEMM calls with explicit strides, shared by the attention, linear and gate/up nodes.

/// C (m, n) = A·B with explicit strides (row stride, column stride) for A and B; C row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (usize, usize),
    bm: &[f32],
    b_strides: (usize, usize),
    par: gemm::Parallelism,
) {
    gemm_acc(c, false, m, n, k, a, a_strides, bm, b_strides, par)
}

/// C (m, n) = A·B, or C += A·B with `accumulate`; strides as in [`gemm_into`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_acc(
    c: &mut [f32],
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    bm: &[f32],
    (b_rs, b_cs): (usize, usize),
    par: gemm::Parallelism,
) {
    assert!(c.len() >= m * n, "gemm_into: C holds {} < {m}×{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "gemm_into: A too short"
    );
    assert!(
        bm.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "gemm_into: B too short"
    );
    // SAFETY: the asserts above bound every index the GEMM reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            bm.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Parallelism for the GEMMs inside one task: the tasks themselves fill the threads unless
/// there are fewer tasks than threads.
pub(super) fn inner_parallelism(tasks: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if tasks >= threads {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

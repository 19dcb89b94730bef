//! Helpers shared by the unit tests (compiled for tests only): comparisons of computed numbers
//! with the hand-computed ones.

/// |a − b| ≤ `tol`.
pub fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// |a − b| ≤ 1e-12: hand-computed values that the code must reproduce to rounding.
pub fn near(a: f64, b: f64) -> bool {
    close(a, b, 1e-12)
}

/// |a − b| ≤ `tol` · (1 + |b|): absolute near zero, relative for large values.
pub fn close_rel(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// Same length and every pair within `tol`; the message shows both slices.
#[track_caller]
pub fn assert_close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!(close(*x, *y, tol), "{a:?} vs {b:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons() {
        assert!(close(1.0, 1.1, 0.1 + 1e-15) && !close(1.0, 1.2, 0.1));
        assert!(near(0.1 + 0.2, 0.3) && !near(0.0, 1e-11));
        // 1e6 vs 1e6 + 0.5: relative 5e-7 · (1 + 1e6) ≈ 0.5.
        assert!(close_rel(1e6 + 0.5, 1e6, 5e-7) && !close_rel(1e6 + 0.6, 1e6, 5e-7));
        assert_close(&[1.0, 2.0], &[1.0, 2.0 + 1e-9], 1e-8);
        assert!(std::panic::catch_unwind(|| assert_close(&[1.0], &[1.0, 2.0], 1.0)).is_err());
    }
}

//! `model.dtype = "bf16"`: a bf16 run resumes exactly; a bad dtype is a clear config error.
use grove::config;

/// The quickstart in bf16, stopped after 3 steps and resumed, equals the uninterrupted run:
/// the same metrics and bit-identical final weights (same machine: the bf16 kernel is chosen
/// by the CPU).
#[test]
fn a_bf16_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = crate::train_rewards::assert_resumes_exactly(
        tmp.path(),
        5,
        &["model.dtype=\"bf16\"".into()],
    );
    assert_eq!(lines.len(), 6);
}

#[test]
fn an_unknown_dtype_names_the_known_ones() {
    let err = config::load(None, &["model.dtype=\"fp16\"".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fp16") && err.contains("f32") && err.contains("bf16"),
        "{err}"
    );
}

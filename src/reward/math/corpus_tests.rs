//! The verifier corpus (tests/data/verifier_corpus.jsonl): hand-written cases in the forms
//! real models and datasets write on GSM8K and MATH-500, each with the verdict a careful
//! human grader gives. False positives count as much as false negatives.
use super::MathVerifier;
use std::path::PathBuf;

/// One corpus line.
struct Case {
    line: usize,
    response: String,
    reference: String,
    expected: bool,
    note: String,
}

fn corpus() -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/verifier_corpus.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let field = |row: &serde_json::Value, name: &str, line: usize| -> serde_json::Value {
        row.get(name)
            .cloned()
            .unwrap_or_else(|| panic!("{}:{line}: missing field `{name}`", path.display()))
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line = i + 1;
            let row: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{line}: {e}", path.display()));
            let text_of = |name: &str| field(&row, name, line).as_str().map(str::to_string);
            Case {
                line,
                response: text_of("response").expect("response is a string"),
                reference: text_of("reference").expect("reference is a string"),
                expected: field(&row, "expected", line)
                    .as_bool()
                    .expect("expected is a boolean"),
                note: text_of("note").unwrap_or_default(),
            }
        })
        .collect()
}

#[test]
fn corpus_verdicts_match_careful_grading() {
    let cases = corpus();
    assert!(cases.len() >= 300, "corpus has only {} cases", cases.len());
    let positives = cases.iter().filter(|c| c.expected).count();
    let verifier = MathVerifier::default();
    let mut failures = Vec::new();
    let (mut false_pos, mut false_neg) = (0, 0);
    for c in &cases {
        let d = verifier.decide(&c.response, &c.reference);
        if d.correct != c.expected {
            if d.correct {
                false_pos += 1;
            } else {
                false_neg += 1;
            }
            failures.push(format!(
                "line {} ({}): expected {}, got {} [{}] {}",
                c.line, c.note, c.expected, d.correct, d.rule, d.reason
            ));
        }
    }
    let agree = cases.len() - failures.len();
    println!(
        "verifier corpus: {agree}/{} agree ({:.1}%), {positives} positives, {} negatives, \
         {false_pos} false positives, {false_neg} false negatives",
        cases.len(),
        100.0 * agree as f64 / cases.len() as f64,
        cases.len() - positives
    );
    for f in &failures {
        println!("  {f}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

//! Unit tests of the math verifier (extraction, normalisation, equivalence, budgets, real data).
use super::numeric::Ratio;
use super::*;
use std::path::PathBuf;
use std::time::Instant;

fn v() -> MathVerifier {
    MathVerifier::default()
}

fn score(response: &str, reference: &str) -> f64 {
    v().verify(response, reference).score
}

fn eq(a: &str, b: &str) -> bool {
    v().equivalent(a, b)
}

// ---- extraction ----

#[test]
fn hashes_take_priority_over_boxed_and_numbers() {
    let r = "We get \\boxed{7} first, then 99.\n#### 18\n";
    let e = v().extract(r).unwrap();
    assert_eq!(e.text, "18");
    assert_eq!(e.source, AnswerSource::Hashes);
}

#[test]
fn markdown_headings_are_not_hash_answers() {
    let r = "#### Step 1: add\n2+3=5\n#### Final Answer\n$\\boxed{5}$";
    let e = v().extract(r).unwrap();
    assert_eq!((e.text.as_str(), e.source), ("5", AnswerSource::Boxed));
    // A real `#### n` before a later heading still counts.
    let e = v().extract("#### 18\n#### Notes\nnothing else").unwrap();
    assert_eq!((e.text.as_str(), e.source), ("18", AnswerSource::Hashes));
    assert_eq!(score("#### $18.00", "18"), 1.0);
}

#[test]
fn last_boxed_wins_and_nested_braces_are_kept() {
    let r = "first \\boxed{1}, finally $\\boxed{\\frac{1}{\\sqrt{4}}}$ done";
    let e = v().extract(r).unwrap();
    assert_eq!(e.text, "\\frac{1}{\\sqrt{4}}");
    assert_eq!(e.source, AnswerSource::Boxed);
    assert_eq!(score(r, "1/2"), 1.0); // 1/sqrt(4) = 1/2
}

#[test]
fn boxed_without_braces_and_fbox() {
    assert_eq!(v().extract("so $\\boxed 5$.").unwrap().text, "5");
    assert_eq!(v().extract("so \\fbox{12} ok").unwrap().text, "12");
    // `\boxedx` is not `\boxed`: no braces and no space → falls through to the last number.
    let e = v().extract("\\boxedx 3").unwrap();
    assert_eq!(e.source, AnswerSource::LastNumber);
}

#[test]
fn unbalanced_last_boxed_falls_back_to_an_earlier_one() {
    let e = v().extract("\\boxed{4} and then \\boxed{5").unwrap();
    assert_eq!(e.text, "4");
}

#[test]
fn empty_boxed_is_skipped() {
    // An echo of the instruction "put it in \boxed{}" must not hide the real answer.
    let e = v()
        .extract("\\boxed{9}. Put your answer in \\boxed{}")
        .unwrap();
    assert_eq!(e.text, "9");
}

#[test]
fn answer_lines() {
    let e = v().extract("work...\nThe answer is 42. Done.").unwrap();
    assert_eq!(
        (e.text.as_str(), e.source),
        ("42", AnswerSource::AnswerLine)
    );
    assert_eq!(v().extract("**Answer:** 3.5\n").unwrap().text, "3.5");
    assert_eq!(
        v().extract("Final answer: $\\frac{2}{3}$.").unwrap().text,
        "\\frac{2}{3}"
    );
    assert_eq!(score("The answer is 18 dollars.", "18"), 1.0);
}

#[test]
fn last_number_fallback_can_be_switched_off() {
    let r = "we computed 3 then 1,250 apples.";
    let e = v().extract(r).unwrap();
    assert_eq!(
        (e.text.as_str(), e.source),
        ("1,250", AnswerSource::LastNumber)
    );
    assert_eq!(score(r, "1250"), 1.0);
    let strict = MathVerifier {
        last_number_fallback: false,
        ..MathVerifier::default()
    };
    let verdict = strict.verify(r, "1250");
    assert_eq!(verdict.score, 0.0);
    assert_eq!(verdict.reason, "no answer found");
    assert_eq!(verdict.extracted, None);
}

#[test]
fn last_number_picks_signed_decimals_and_list_tails() {
    assert_eq!(v().extract("x is -3.25.").unwrap().text, "-3.25");
    assert_eq!(v().extract("values 1,2,3").unwrap().text, "3");
}

#[test]
fn reasons() {
    let ok = v().verify("#### 0.3333333", "1/3");
    assert_eq!(ok.score, 1.0);
    assert_eq!(ok.reason, "correct (numeric-tolerance): 0.3333333 == 1/3");
    assert_eq!(ok.extracted.as_deref(), Some("0.3333333"));
    let bad = v().verify("#### 12", "13");
    assert_eq!(bad.score, 0.0);
    assert_eq!(
        bad.reason,
        "mismatch (exact-rational): extracted 12 vs reference 13"
    );
    let none = v().verify("no digits here", "13");
    assert_eq!(none.reason, "no answer found");
    let empty_ref = v().verify("#### 12", "  ");
    assert_eq!(
        (empty_ref.score, empty_ref.reason.as_str()),
        (0.0, "reference answer is empty")
    );
}

// ---- normalisation ----

#[test]
fn normalisation_cases() {
    let cases = [
        ("1,000", "1000"),
        ("\\$1,234,567.50", "1234567.5"),
        ("10,\\!080", "10080"),
        ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
        ("(1,2)", "(1,2)"),
        ("3, 5, 7", "3,5,7"),
        ("5.00", "5"),
        ("-2.50", "-2.5"),
        ("50\\%", "50"),
        ("90^\\circ", "90"),
        ("120^{\\circ}", "120"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\dfrac{17}{50}", "\\frac{17}{50}"),
        ("\\tfrac12", "\\frac12"),
        ("5.4 \\text{ cents}", "5.4"),
        ("15\\mbox{ cm}^2", "15"),
        ("864 \\mbox{ inches}^2", "864"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}7"),
        ("\\text{(B)}", "(B)"),
        ("\\text{Evelyn}", "Evelyn"),
        ("x = 5", "5"),
        ("x \\in [-2,7]", "[-2,7]"),
        ("4210_{5}", "4210_5"),
        ("42.", "42"),
        ("$\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("18 dollars", "18"),
        ("\u{2212}7", "-7"),
        (
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
            "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        ),
    ];
    for (raw, want) in cases {
        assert_eq!(normalize_answer(raw), want, "normalising {raw:?}");
    }
}

// ---- equivalence ----

#[test]
fn integers_decimals_and_fractions() {
    assert!(eq("12/36", "1/3")); // 12/36 reduces to 1/3 exactly
    assert!(eq("\\frac{12}{36}", "\\frac13"));
    assert!(eq("0.3333333", "1/3")); // |0.3333333 − 1/3| = 3.3e-8 ≤ 1e-6 · 1/3
    assert!(!eq("0.3333", "1/3")); // 3.3e-5 > 3.3e-7: too coarse for rel_tol 1e-6
    assert!(eq("0.5", "\\frac{1}{2}"));
    assert!(eq(".35625", "0.35625"));
    assert!(eq("1,000", "1000"));
    assert!(eq("18.00", "18"));
    assert!(!eq("18.01", "18"));
    // Exact comparison distinguishes integers that f64 cannot (2^53 + 1 vs 2^53).
    assert!(!eq("9007199254740993", "9007199254740992"));
    // Two terminating decimals are compared exactly, never with tolerance.
    assert!(!eq("1.0000001", "1"));
    // 2/3 as 0.66666667 (rounded): |diff| = 3.3e-9 → equal.
    assert!(eq("0.66666667", "\\frac{2}{3}"));
}

#[test]
fn frac_forms_and_mixed_numbers() {
    assert!(eq("\\frac 34", "0.75"));
    assert!(eq("\\frac9{19}", "9/19"));
    assert!(eq("\\frac{270}7\\text{ degrees}", "270/7"));
    assert!(eq("1\\frac{4}{5}", "\\frac{9}{5}")); // mixed number: 1 + 4/5
    assert!(eq("137 \\frac{1}{2}", "137.5"));
    assert!(eq("-1\\frac12", "-1.5")); // −(1 + 1/2)
}

#[test]
fn sqrt_pi_and_arithmetic() {
    assert!(eq("2\\sqrt{5}", "\\sqrt{20}")); // 2·2.2360679 = 4.4721359 = √20
    assert!(eq("\\sqrt{16}", "4")); // perfect square → exact
    assert!(eq("11\\sqrt2", "\\sqrt{242}")); // 11²·2 = 242
    assert!(eq("\\frac{\\sqrt{3}}{3}", "1/\\sqrt{3}"));
    assert!(eq("12\\pi", "6\\cdot2\\pi"));
    assert!(eq("\\frac{20000}{\\pi}", "20000/\\pi"));
    assert!(!eq("\\pi", "3.14"));
    assert!(eq("2^{10}", "1024"));
    assert!(eq("2^23", "12")); // LaTeX: 2^2 · 3
    assert!(eq("(1+2)(3+4)", "21"));
    assert!(eq("-2^2", "-4")); // unary minus binds looser than ^
    assert!(eq("2^{-2}", "0.25"));
    assert!(eq("8^{1/3}", "2")); // 8^(1/3) = 2 via floating point, within 1e-6
    assert!(eq("\\sqrt[3]{27}", "3"));
    assert!(eq("3\\times 4 \\div 6", "2"));
}

#[test]
fn division_by_zero_is_not_a_number() {
    assert!(evaluate("1/0").is_none());
    assert!(evaluate("\\frac{1}{0}").is_none());
    assert!(!eq("1/0", "2/0"));
}

#[test]
fn tuples_intervals_and_sets() {
    assert!(eq("(1,2)", "(1, 2)"));
    assert!(eq("(0.5, 3)", "(\\frac12, 3)"));
    assert!(!eq("(1,2)", "(2,1)")); // tuples are ordered
    assert!(!eq("(1,2)", "[1,2]")); // interval brackets must match
    assert!(!eq("(1,2]", "(1,2)"));
    assert!(eq(
        "\\left(\\frac{3}{5},\\frac{8}{3}\\right]",
        "(0.6,\\frac83]"
    ));
    assert!(eq("(-\\infty, 0]", "(-\\infty,0]"));
    assert!(eq(
        "(-\\infty, 2) \\cup (3, \\infty)",
        "(-\\infty,2)\\cup(3,\\infty)"
    ));
    assert!(!eq("(0,9) \\cup (9,36)", "(0,36)"));
    assert!(eq("1,-2", "-2, 1")); // bare lists of solutions ignore order
    assert!(eq("\\{1,2\\}", "\\{2,1\\}"));
    assert!(!eq("1,2", "1,2,3"));
    assert!(!eq("(1,2)", "1,2")); // a tuple is not a bare list
    assert!(eq(
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",
        "\\begin{pmatrix} -\\frac13 \\\\ \\frac{2}{3} \\end{pmatrix}"
    ));
}

#[test]
fn lists_over_the_element_budget_compare_as_text() {
    let forward: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let mut backward = forward.clone();
    backward.reverse();
    // 200 elements > MAX_TOTAL_ELEMENTS: not matched element-wise, so order now matters.
    assert!(eq(&forward.join(","), &forward.join(",")));
    assert!(!eq(&forward.join(","), &backward.join(",")));
    // Within the budgets (≤ 64 per level, ≤ 128 in all) lists match in any order.
    assert!(eq(&forward[..60].join(","), &backward[140..].join(",")));
}

#[test]
fn string_fallback() {
    assert!(eq("\\text{(C)}", "(C)"));
    assert!(eq("x^5 - x^4 + x", "x^5-x^4+x"));
    assert!(eq("y = 2x + 3", "y=2x+3"));
    assert!(!eq("\\text{even}", "\\text{odd}"));
    assert!(eq("204_5", "204_{5}"));
}

#[test]
fn canonical_answers_group_equivalent_numbers() {
    assert_eq!(canonical_answer("0.5"), "1/2");
    assert_eq!(canonical_answer("\\frac{2}{4}"), "1/2");
    assert_eq!(canonical_answer("1,000"), "1000");
    assert_eq!(canonical_answer("(1,2)"), "(1,2)");
    assert_eq!(canonical_answer("\\text{east}"), "east");
}

// ---- adversarial inputs: each must return (timings printed, not asserted) ----

/// Verifies 5 times and prints the median time (the machine is shared, so single runs
/// pick up scheduling noise); timings are reported, never asserted.
fn timed_verify(label: &str, response: &str, reference: &str) -> Verdict {
    let verifier = v();
    let mut micros = Vec::new();
    let mut verdict = verifier.verify(response, reference);
    for _ in 0..5 {
        let start = Instant::now();
        verdict = verifier.verify(response, reference);
        micros.push(start.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    println!(
        "adversarial {label:<28} median {:>7.1} µs  score {} reason {:?}",
        micros[2],
        verdict.score,
        shorten(&verdict.reason)
    );
    verdict
}

#[test]
fn adversarial_inputs_return_quickly() {
    let digits = "7".repeat(1 << 20);
    let nested_open = format!("\\boxed{}", "{".repeat(10_000));
    let nested_balanced = format!("\\boxed{}5{}", "{".repeat(10_000), "}".repeat(10_000));
    let many_boxed = "\\boxed{".repeat(20_000);
    let unicode = "\u{1f600} \u{200f}\u{645}\u{631}\u{62d}\u{628}\u{627}\u{200e} e\u{301}\u{0}\u{202e}\\boxed{5\u{0}} \u{202e} \u{1f680}".repeat(10);
    let paren_bomb = format!("#### {}5{}", "(".repeat(100), ")".repeat(100));
    let long_boxed_expr = format!("\\boxed{{{}}}", "1+".repeat(120) + "1");
    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("1 MB of digits", digits.clone()),
        ("1 MB of digits then ####", format!("{digits}\n#### 5")),
        ("unbalanced \\boxed{{{", "\\boxed{{{".to_string()),
        ("10k nested open braces", nested_open),
        ("10k nested balanced braces", nested_balanced),
        ("20k repeated \\boxed{", many_boxed),
        ("unicode emoji RTL NUL", unicode.clone()),
        ("100 nested parentheses", paren_bomb),
        ("240-term sum", long_boxed_expr),
        ("only backslashes", "\\".repeat(100_000)),
        ("answer: x 10k times", "answer ".repeat(10_000)),
    ];
    for (label, input) in &cases {
        let verdict = timed_verify(label, input, "5");
        assert!(verdict.score == 0.0 || verdict.score == 1.0);
    }
    // Worst case for unordered list matching: 50 elements each way, reversed, every
    // element needing the evaluator, so the greedy matcher tries ~50²/2 pairs.
    let forward: Vec<String> = (1..=50).map(|i| format!("\\frac{{{}}}{{7}}", i)).collect();
    let backward: Vec<String> = (1..=50).rev().map(|i| format!("{}/7", i)).collect();
    let list_verdict = timed_verify(
        "50-element lists, reversed",
        &format!("\\boxed{{{}}}", backward.join(",")),
        &forward.join(","),
    );
    assert_eq!(list_verdict.score, 1.0);
    // Spot-check that the sane parts of adversarial inputs are still read correctly.
    assert_eq!(v().verify(&format!("{digits}\n#### 5"), "5").score, 1.0);
    assert_eq!(v().verify(&unicode, "5").score, 0.0); // "5\0" is not "5"
    assert_eq!(v().verify("", "5").reason, "no answer found");
    assert_eq!(v().verify(&digits, "5").reason, "no answer found");
    // An adversarial reference is bounded too: it is only compared as a string.
    let huge_reference = timed_verify("1 MB of digits as reference", "#### 7", &digits);
    assert_eq!(huge_reference.score, 0.0);
    assert!(eq(&digits, &digits));
}

#[test]
fn random_token_soup_never_panics() {
    use rand::{Rng, SeedableRng};
    const TOKENS: [&str; 48] = [
        "\\boxed{",
        "\\boxed ",
        "\\fbox{",
        "}",
        "{",
        "####",
        "answer:",
        "The answer is ",
        "\\frac",
        "\\dfrac",
        "\\sqrt",
        "\\sqrt[3]",
        "[",
        "]",
        "(",
        ")",
        ",",
        "1",
        "0",
        ".",
        "-",
        "+",
        "^",
        "\\pi",
        "\\text{",
        "\\left(",
        "\\right]",
        "\\cup",
        "\\{",
        "\\}",
        "\\\\",
        "&",
        "\\begin{pmatrix}",
        "\\end{pmatrix}",
        "\u{1f600}",
        "\u{0}",
        " ",
        "\n",
        "=",
        "x",
        "$",
        "%",
        "\\!",
        ",\\!",
        "e\u{301}",
        "/",
        "\\cdot",
        "99999999999999999999999999999999999999999",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let soup = |rng: &mut rand_chacha::ChaCha8Rng| {
        let len = rng.gen_range(0..60);
        (0..len)
            .map(|_| TOKENS[rng.gen_range(0..TOKENS.len())])
            .collect::<String>()
    };
    let (mut slowest, mut correct) = (0.0f64, 0);
    let mut slowest_pair = (String::new(), String::new());
    for _ in 0..3000 {
        let response = soup(&mut rng);
        let reference = soup(&mut rng);
        let start = Instant::now();
        let verdict = v().verify(&response, &reference);
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed > slowest {
            slowest = elapsed;
            slowest_pair = (response.clone(), reference.clone());
        }
        assert!(verdict.score == 0.0 || verdict.score == 1.0);
        correct += usize::from(verdict.score == 1.0);
        // Every answer is equivalent to itself; boxing it must not panic either.
        assert!(eq(&reference, &reference), "{reference:?}");
        let boxed = v().verify(&format!("so \\boxed{{{reference}}}"), &reference);
        assert!(boxed.score == 0.0 || boxed.score == 1.0);
    }
    println!(
        "token soup: 3000 pairs, {correct} judged correct, slowest {:.1} µs",
        slowest * 1e6
    );
    timed_verify(
        "slowest soup pair, re-timed",
        &slowest_pair.0,
        &slowest_pair.1,
    );
}

#[test]
fn evaluator_depth_is_capped() {
    let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
    assert!(evaluate(&deep).is_none()); // deeper than MAX_EVAL_DEPTH
    let shallow = format!("{}1{}", "(".repeat(10), ")".repeat(10));
    assert_eq!(evaluate(&shallow), Some(Value::Exact(Ratio::int(1))));
    assert!(evaluate(&"9".repeat(600)).is_none()); // longer than MAX_EXPR_BYTES
                                                   // 40 digits: beyond exact range, read as f64 instead.
    assert!(matches!(evaluate(&"9".repeat(40)), Some(Value::Approx(_))));
    assert!(evaluate("10^{400}").is_none()); // overflows f64 → not a number
}

// ---- real data ----

/// `../shared/data` beside the crate, else the shared folder of the workspace.
fn data_dir() -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if beside.is_dir() {
        beside
    } else {
        PathBuf::from("/work/shared/data")
    }
}

fn read_jsonl(relative: &str) -> Vec<serde_json::Value> {
    let path = data_dir().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

fn field<'a>(row: &'a serde_json::Value, name: &str) -> &'a str {
    row.get(name)
        .and_then(|x| x.as_str())
        .expect("string field")
}

#[test]
fn every_gsm8k_test_reference_solution_is_judged_correct() {
    let rows = read_jsonl("gsm8k/test.jsonl");
    assert_eq!(rows.len(), 1319);
    let start = Instant::now();
    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let solution = field(row, "answer");
        let Some((_, final_answer)) = solution.rsplit_once("#### ") else {
            panic!("row {i} has no '#### '");
        };
        let verdict = v().verify(solution, final_answer.trim());
        if verdict.score != 1.0 {
            failures.push(format!("row {i}: {}", verdict.reason));
        }
    }
    println!(
        "GSM8K: {}/{} reference solutions correct ({:.1} ms total)",
        rows.len() - failures.len(),
        rows.len(),
        start.elapsed().as_secs_f64() * 1e3
    );
    assert!(failures.is_empty(), "failures: {failures:#?}");
    // Negative control: each solution against the NEXT row's final answer.
    let shifted_correct = (0..rows.len())
        .filter(|&i| {
            let next = field(&rows[(i + 1) % rows.len()], "answer");
            let next_answer = next.rsplit_once("#### ").map_or("", |(_, a)| a.trim());
            v().verify(field(&rows[i], "answer"), next_answer).score == 1.0
        })
        .count();
    println!("GSM8K negative control: {shifted_correct}/1319 shifted pairs judged correct");
    assert!(
        shifted_correct < 66,
        "verifier too lenient: {shifted_correct}/1319"
    );
}

#[test]
fn math500_numeric_answers_match_their_canonical_rewrites() {
    // Each MATH-500 answer that evaluates to a number, rewritten as the evaluator's canonical
    // form (`\\frac{3}{56}` → `3/56`, `10,\\!080` → `10080`), must still be judged correct,
    // and the same form plus one must be judged wrong.
    let rows = read_jsonl("math500/test.jsonl");
    let (mut numeric, mut failures) = (0, Vec::new());
    for (i, row) in rows.iter().enumerate() {
        let answer = field(row, "answer");
        let canonical = canonical_answer(answer);
        if evaluate(&canonical).is_none() {
            continue;
        }
        numeric += 1;
        let same = v().verify(&format!("\\boxed{{{canonical}}}"), answer);
        let off_by_one = v().verify(&format!("\\boxed{{{canonical}+1}}"), answer);
        if same.score != 1.0 || off_by_one.score != 0.0 {
            failures.push(format!("row {i}: {answer:?} as {canonical:?}"));
        }
    }
    println!("MATH-500: {numeric} numeric answers re-judged via canonical form");
    assert!(numeric > 300, "only {numeric} numeric answers");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn math500_last_boxed_matches_answer_for_99_percent() {
    let rows = read_jsonl("math500/test.jsonl");
    assert_eq!(rows.len(), 500);
    let start = Instant::now();
    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let verdict = v().verify(field(row, "solution"), field(row, "answer"));
        if verdict.score != 1.0 {
            failures.push(format!("row {i}: {}", verdict.reason));
        }
    }
    let correct = rows.len() - failures.len();
    println!(
        "MATH-500: {correct}/{} last \\boxed{{}} equivalent to answer ({:.1} ms total)",
        rows.len(),
        start.elapsed().as_secs_f64() * 1e3
    );
    for f in &failures {
        println!("  MATH-500 failure {f}");
    }
    // ≥ 99% means at most 5 of 500 rows may fail.
    assert!(correct * 100 >= rows.len() * 99, "{failures:#?}");
    // Negative control: each solution against the NEXT row's answer. Only rows whose two
    // answers coincide (many are small integers) may pass.
    let shifted_correct = (0..rows.len())
        .filter(|&i| {
            let next = &rows[(i + 1) % rows.len()];
            v().verify(field(&rows[i], "solution"), field(next, "answer"))
                .score
                == 1.0
        })
        .count();
    println!("MATH-500 negative control: {shifted_correct}/500 shifted pairs judged correct");
    assert!(
        shifted_correct < 25,
        "verifier too lenient: {shifted_correct}/500"
    );
}

// ---- time budget ----

/// 26 numbers that each cost two 499-step binomials to evaluate (`\\binom{999}{499}` over itself,
/// plus k), listed in opposite orders on the two sides: the unordered match compares ~350 pairs
/// (≈ 700k evaluation steps) before it succeeds. It fits the extraction limit.
fn pathological_list(reversed: bool) -> String {
    let mut items: Vec<String> = (0..26)
        .map(|k| format!("\\binom{{999}}{{499}}/\\binom{{999}}{{499}}+{k}"))
        .collect();
    if reversed {
        items.reverse();
    }
    items.join(",")
}

#[test]
fn a_pathological_comparison_stops_at_its_deadline() {
    let response = format!("\\boxed{{{}}}", pathological_list(true));
    let reference = pathological_list(false);
    assert!(response.len() < MAX_ANSWER_BYTES);
    let short = MathVerifier {
        time_budget: std::time::Duration::from_micros(50),
        ..MathVerifier::default()
    };
    let start = Instant::now();
    let d = short.decide(&response, &reference);
    println!(
        "pathological list, 50 µs budget: {:?} in {:?}",
        d.rule,
        start.elapsed()
    );
    assert_eq!((d.correct, d.rule), (false, "timeout"));
    assert!(d.reason.contains("timeout after 50µs"), "{}", d.reason);
    // Given time, the same comparison runs to its end: the lists are equal.
    let patient = MathVerifier {
        time_budget: std::time::Duration::from_secs(60),
        ..MathVerifier::default()
    };
    let start = Instant::now();
    let d = patient.decide(&response, &reference);
    println!(
        "pathological list, 60 s budget: {:?} in {:?}",
        d.rule,
        start.elapsed()
    );
    assert_eq!((d.correct, d.rule), (true, "set-unordered"));
}

#[test]
fn percent_rule_scales_only_the_side_written_with_percent() {
    assert!(eq("10\\%", "0.1"));
    assert!(eq("10\\%", "10"));
    assert!(eq("0.1", "10\\%"));
    assert!(!eq("0.1", "10")); // no % on either side: values must match
    assert!(!eq("10\\%", "0.01"));
    let d = v().decide("\\boxed{10\\%}", "0.1");
    assert_eq!((d.correct, d.rule), (true, "percent"));
}

#[test]
fn relations_reduce_to_values_intervals_or_compare_rearranged() {
    assert!(eq("x \\geq 5", "[5,\\infty)"));
    assert!(!eq("x > 5", "[5,\\infty)"));
    assert!(eq("-2 < x \\le 3", "(-2,3]"));
    assert!(eq("2x - y + 3 = 0", "y = 2x + 3"));
    assert!(!eq("2x - y - 3 = 0", "y = 2x + 3"));
    assert!(eq("2x < 6", "x < 3"));
    assert!(!eq("-2x < -6", "x < 3")); // dividing by -2 flips the inequality
    let d = v().decide("\\boxed{y = 2x + 3}", "2x+3");
    assert_eq!((d.correct, d.rule), (true, "random-points"));
}

#[test]
fn random_points_tell_close_expressions_apart() {
    assert!(eq("(x+1)^2", "x^2+2x+1"));
    assert!(!eq("(x+1)^2", "x^2+2x+1.000001"));
    assert!(!eq("|x|", "x"));
    assert!(eq("\\sqrt{x^2}", "|x|"));
    assert!(eq("\\sin^2 x + \\cos^2 x", "1"));
    assert!(!eq("\\frac{1}{x-1}", "\\frac{1}{1-x}"));
}

//! Math answer verifier: every math reward grove gives goes through here.
//!
//! [`MathVerifier::verify`] extracts a final answer from a model response (`extract.rs`),
//! normalises it and the reference the same way (`normalize.rs`), parses both into answer
//! structures over an expression tree (`answer.rs`, `expr.rs`) and decides equivalence
//! (`equiv.rs`): exact rational arithmetic first, then relative tolerance for irrational values,
//! then evaluation at deterministic random points for expressions with free variables. The
//! score is 1.0 (correct) or 0.0; [`MathVerifier::decide`] also says which rule decided and why.
//! docs/verifier.md lists every supported form and rule with its known limits.
//!
//! Robustness: the verifier never panics and its work is bounded: only the last
//! `max_scan_bytes` of a response are scanned, answers longer than [`MAX_ANSWER_BYTES`] are
//! ignored, the parser's recursion is capped, and each comparison stops at `time_budget`
//! (a pathological answer is then judged incorrect with the rule `timeout`).

mod answer;
#[cfg(test)]
mod corpus_tests;
mod equiv;
mod eval;
mod expr;
mod extract;
mod normalize;
mod numeric;
mod show;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use answer::Answer;
pub use expr::{MAX_EVAL_DEPTH, MAX_EXPR_BYTES};
pub use extract::AnswerSource;
pub use normalize::normalize_answer;
pub use numeric::MAX_EXACT_DIGITS;

pub use super::Verdict;
use equiv::{Ctx, Judgement};
use eval::Budget;
use numeric::Value;

/// Longest extracted answer (bytes) that is considered at all; longer candidates are skipped.
pub const MAX_ANSWER_BYTES: usize = 1024;
/// Longest string shown in a verdict's reason (characters).
const MAX_REASON_CHARS: usize = 80;

/// An answer extracted from a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The raw answer text, trimmed.
    pub text: String,
    /// Which extraction rule found it.
    pub source: AnswerSource,
}

/// A verdict that explains itself: what was compared, which rule decided, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub correct: bool,
    /// The deciding rule (`exact-rational`, `random-points`, `set-unordered`, `timeout`,
    /// `no-answer`, ...; docs/verifier.md lists them all).
    pub rule: &'static str,
    pub reason: String,
    /// The answer found in the response and the rule that found it.
    pub extracted: Option<Extracted>,
    /// The response's answer as parsed (after reductions such as `x = 5` → `5`).
    pub parsed_response: Option<String>,
    /// The reference as parsed.
    pub parsed_reference: String,
}

impl Decision {
    /// The reward form: score 1/0, the reason, the extracted text.
    pub fn verdict(&self) -> Verdict {
        Verdict {
            score: if self.correct { 1.0 } else { 0.0 },
            reason: self.reason.clone(),
            extracted: self.extracted.as_ref().map(|e| e.text.clone()),
        }
    }
}

/// Verifier for math answers (GSM8K `#### n`, MATH `\boxed{}`, prose and LaTeX answers).
#[derive(Debug, Clone, PartialEq)]
pub struct MathVerifier {
    /// Fall back to the last math block, then the last number, when no marked answer
    /// (`####`, `\boxed{}`, an answer marker) is found.
    pub last_number_fallback: bool,
    /// Relative tolerance for inexact comparisons (`\sqrt`, `\pi`, non-terminating fractions).
    pub rel_tol: f64,
    /// Only the last this-many bytes of a response are scanned for an answer.
    pub max_scan_bytes: usize,
    /// Wall-clock limit of one comparison; past it the answer is judged incorrect (`timeout`).
    pub time_budget: Duration,
}

impl Default for MathVerifier {
    fn default() -> Self {
        Self {
            last_number_fallback: true,
            rel_tol: 1e-6,
            max_scan_bytes: 32 * 1024,
            time_budget: Duration::from_millis(50),
        }
    }
}

impl MathVerifier {
    /// Scores `response` against the reference answer `reference` (an answer, not a solution).
    pub fn verify(&self, response: &str, reference: &str) -> Verdict {
        self.decide(response, reference).verdict()
    }

    /// [`Self::verify`] with the audit: extracted answer, parsed forms, deciding rule.
    pub fn decide(&self, response: &str, reference: &str) -> Decision {
        let reference = unwrap_reference(reference);
        let reference_norm = normalize::normalize_keep_relations(reference);
        let parsed_reference = answer::parse_answer(&reference_norm);
        let mut decision = Decision {
            correct: false,
            rule: "no-answer",
            reason: "no answer found".to_string(),
            extracted: None,
            parsed_response: None,
            parsed_reference: parsed_reference.describe(),
        };
        if reference_norm.is_empty() {
            decision.rule = "empty-reference";
            decision.reason = "reference answer is empty".to_string();
            return decision;
        }
        let Some(found) = self.extract(response) else {
            return decision;
        };
        let answer_norm = normalize::normalize_keep_relations(&found.text);
        decision.extracted = Some(found.clone());
        if answer_norm.is_empty() {
            decision.rule = "empty-answer";
            decision.reason = "extracted answer is empty after normalisation".to_string();
            return decision;
        }
        let parsed_response = answer::parse_answer(&answer_norm);
        decision.parsed_response = Some(parsed_response.describe());
        let (a, r) = (shorten(&answer_norm), shorten(&reference_norm));
        let judgement = if answer_norm == reference_norm {
            Some(Judgement {
                equal: true,
                rule: "same-text",
            })
        } else {
            let percent = (
                normalize::has_percent(&found.text),
                normalize::has_percent(reference),
            );
            self.compare(parsed_response, parsed_reference, percent)
        };
        match judgement {
            Some(j) if j.equal => {
                decision.correct = true;
                decision.rule = j.rule;
                decision.reason = format!("correct ({}): {a} == {r}", j.rule);
            }
            Some(j) => {
                decision.rule = j.rule;
                decision.reason = format!("mismatch ({}): extracted {a} vs reference {r}", j.rule);
            }
            None => {
                decision.rule = "timeout";
                decision.reason = format!(
                    "timeout after {:?}: comparison stopped, judged incorrect",
                    self.time_budget
                );
            }
        }
        decision
    }

    /// Compares parsed answers under the time budget; the percent rule: a side written with
    /// `%` also matches its value divided by 100. None on timeout.
    fn compare(
        &self,
        response: Answer,
        reference: Answer,
        percent: (bool, bool),
    ) -> Option<Judgement> {
        let mut ctx = Ctx {
            rel_tol: self.rel_tol,
            budget: Budget::until(Instant::now() + self.time_budget),
        };
        if matches!(
            (&response, &reference),
            (Answer::Relation(..), Answer::Relation(..))
        ) {
            let as_written = equiv::same_relations(&response, &reference, &mut ctx)?;
            if as_written.equal {
                return Some(as_written);
            }
        }
        let (response, reference) = (equiv::reduce(response), equiv::reduce(reference));
        let plain = equiv::same(&response, &reference, &mut ctx)?;
        if plain.equal || percent.0 == percent.1 {
            return Some(plain);
        }
        let scaled = match (&response, &reference, percent) {
            (Answer::Expr(x), Answer::Expr(y), (true, false)) => equiv::same(
                &Answer::Expr(equiv::percent_of(x)),
                &Answer::Expr(y.clone()),
                &mut ctx,
            )?,
            (Answer::Expr(x), Answer::Expr(y), (false, true)) => equiv::same(
                &Answer::Expr(x.clone()),
                &Answer::Expr(equiv::percent_of(y)),
                &mut ctx,
            )?,
            _ => return Some(plain),
        };
        Some(if scaled.equal {
            Judgement {
                equal: true,
                rule: "percent",
            }
        } else {
            plain
        })
    }

    /// Extracts the final answer from a response, trying the rules in priority order.
    pub fn extract(&self, response: &str) -> Option<Extracted> {
        let window = extract::tail_window(response, self.max_scan_bytes);
        let (text, source) = extract::extract_answer(window, self.last_number_fallback)?;
        Some(Extracted { text, source })
    }

    /// Whether two raw answers (not responses) are equivalent.
    pub fn equivalent(&self, a: &str, b: &str) -> bool {
        let (a, b) = (unwrap_reference(a), unwrap_reference(b));
        let (na, nb) = (
            normalize::normalize_keep_relations(a),
            normalize::normalize_keep_relations(b),
        );
        if na == nb {
            return true;
        }
        let percent = (normalize::has_percent(a), normalize::has_percent(b));
        self.compare(
            answer::parse_answer(&na),
            answer::parse_answer(&nb),
            percent,
        )
        .is_some_and(|j| j.equal)
    }
}

/// A reference as datasets write it: `$...$`, `\(...\)` or `\boxed{...}` around the answer
/// are removed so that it is read exactly like a response's answer.
fn unwrap_reference(reference: &str) -> &str {
    let mut r = reference.trim();
    for (open, close) in [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")] {
        if let Some(inner) = r.strip_prefix(open).and_then(|x| x.strip_suffix(close)) {
            r = inner.trim();
        }
    }
    for cmd in ["\\boxed{", "\\fbox{"] {
        if let Some(inner) = r.strip_prefix(cmd).and_then(|x| x.strip_suffix('}')) {
            if extract::matching_brace(r.as_bytes(), cmd.len() - 1) == Some(r.len() - 1) {
                r = inner.trim();
            }
        }
    }
    r
}

/// A canonical string for an answer, for majority voting: equivalent exact numbers map to the
/// same string (`0.5`, `\frac{1}{2}` and `2/4` all give `1/2`); other answers give their
/// normalised form.
pub fn canonical_answer(raw: &str) -> String {
    let norm = normalize_answer(unwrap_reference(raw));
    match evaluate(&norm) {
        Some(Value::Exact(r)) if r.den == 1 => r.num.to_string(),
        Some(Value::Exact(r)) => format!("{}/{}", r.num, r.den),
        Some(Value::Approx(x)) => format!("{x:.9e}"),
        None => norm,
    }
}

/// The value of a normalised answer that is a variable-free number (None otherwise).
fn evaluate(norm: &str) -> Option<Value> {
    let e = expr::parse_expr(norm)?;
    let mut budget = Budget::until(Instant::now() + Duration::from_millis(50));
    eval::eval_value(&e, &mut budget)
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= MAX_REASON_CHARS {
        return s.to_string();
    }
    let mut out: String = s.chars().take(MAX_REASON_CHARS).collect();
    out.push('…');
    out
}

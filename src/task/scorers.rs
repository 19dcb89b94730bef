//! The rewards a dataset task is scored with, chosen by name (`task.reward`). The names are
//! declared once in [`REWARDS`]; the unknown-name error and docs/tasks.md list them from it.
//!
//! Each scorer is a small pure function of (response, finished, reference) → [`Verdict`],
//! except `external` (a user command, [`crate::reward::external`]). `finished` says the
//! response ended with EOS; a response cut at the token limit is judged only on an explicitly
//! marked answer, so that a policy is not paid for whatever its reasoning had reached when cut.
use std::sync::Mutex;

use regex::Regex;
use serde_json::json;

use crate::error::{Error, Result};
use crate::reward::exact::exact_answer;
use crate::reward::external::{ExternalCommandReward, ExternalConfig, RewardFn, RewardRequest};
use crate::reward::math::MathVerifier;
use crate::reward::Verdict;

/// A reward by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardKind {
    Math,
    Exact,
    Choice,
    Numeric,
    Regex,
    External,
    Pipeline,
}

/// One reward name: what it is, the `[task]` options it reads, what it does.
pub struct RewardSpec {
    pub kind: RewardKind,
    pub name: &'static str,
    pub options: &'static str,
    pub summary: &'static str,
}

/// Every reward name, in the order docs list them.
pub const REWARDS: &[RewardSpec] = &[
    RewardSpec {
        kind: RewardKind::Math,
        name: "math",
        options: "",
        summary:
            "the math verifier: the marked answer (`#### n`, `\\boxed{}`, \"the answer is\"), \
                  else the last number, compared as math (fractions, LaTeX, sets); cut-off \
                  responses count only with a marked answer",
    },
    RewardSpec {
        kind: RewardKind::Exact,
        name: "exact",
        options: "",
        summary: "the response, trimmed, equals the answer, trimmed, and ended with EOS",
    },
    RewardSpec {
        kind: RewardKind::Choice,
        name: "choice",
        options: "",
        summary: "a multiple-choice letter: \"answer is (B)\" / \"answer: B\" (the last such), \
                  else the last \"(B)\", else a response starting \"B.\", \"B)\", \"B:\" or \
                  just \"B\"; the answer is a letter A-Z (\"B\", \"(B)\" or \"b\")",
    },
    RewardSpec {
        kind: RewardKind::Numeric,
        name: "numeric",
        options: "tolerance (absolute, default 1e-6), rel_tolerance (relative, default 0)",
        summary: "the last number of the response (commas as thousands separators allowed) \
                  within max(tolerance, rel_tolerance * abs(answer)) of the answer; a cut-off \
                  response scores 0",
    },
    RewardSpec {
        kind: RewardKind::Regex,
        name: "regex",
        options: "answer_regex (with one capture group)",
        summary: "the first capture group of the last match of answer_regex in the response, \
                  trimmed, equals the answer, trimmed",
    },
    RewardSpec {
        kind: RewardKind::External,
        name: "external",
        options: "[task.external]: command, timeout_s, on_error, failure_reward, \
                  max_consecutive_failures",
        summary: "a user command speaking the reward protocol of docs/rewards.md (one JSON \
                  request per line in, one reward per line out)",
    },
    RewardSpec {
        kind: RewardKind::Pipeline,
        name: "pipeline",
        options: "check (the correctness check, default \"exact\"), [reward.pipeline]",
        summary: "the [reward.pipeline]'s reward trains; `check` (any name above) judges \
                  correctness (acc/eval, reward/correct)",
    },
];

impl RewardKind {
    /// The kind of `name`; the error lists every known name.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        REWARDS
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.kind)
            .ok_or_else(|| format!("unknown reward {name:?}; known: {}", known_rewards()))
    }

    pub fn name(self) -> &'static str {
        REWARDS
            .iter()
            .find(|r| r.kind == self)
            .map_or("?", |r| r.name)
    }
}

/// `math, exact, ...` for messages.
pub fn known_rewards() -> String {
    REWARDS
        .iter()
        .map(|r| r.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The reward table of docs/tasks.md (between its `rewards` markers), from [`REWARDS`].
pub fn rewards_markdown() -> String {
    let mut out = String::from("| reward | options | what it scores |\n|---|---|---|\n");
    for r in REWARDS {
        let options = if r.options.is_empty() {
            "none"
        } else {
            r.options
        };
        out.push_str(&format!("| `{}` | {options} | {} |\n", r.name, r.summary));
    }
    out
}

/// `numeric`'s tolerance: |x − r| ≤ max(absolute, relative·|r|) (Python's `math.isclose`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub absolute: f64,
    pub relative: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            absolute: 1e-6,
            relative: 0.0,
        }
    }
}

/// A reward ready to score: the regex compiled, the external command started.
pub enum Scorer {
    Math(MathVerifier),
    Exact,
    Choice,
    Numeric(Tolerance),
    Regex(Regex),
    External(Box<Mutex<ExternalCommandReward>>),
}

/// What building a scorer reads besides the reward kind.
#[derive(Debug, Clone, Default)]
pub struct ScorerOptions {
    pub tolerance: Tolerance,
    pub answer_regex: Option<String>,
    pub external: Option<ExternalConfig>,
}

/// `answer_regex` compiled; it must have a capture group.
pub fn compile_answer_regex(pattern: &str) -> std::result::Result<Regex, String> {
    let re = Regex::new(pattern).map_err(|e| format!("task.answer_regex {pattern:?}: {e}"))?;
    if re.captures_len() < 2 {
        return Err(format!(
            "task.answer_regex {pattern:?} has no capture group: wrap the answer part in ( )"
        ));
    }
    Ok(re)
}

impl Scorer {
    /// The scorer of `kind` (`pipeline` is not a scorer: its `check` is).
    pub fn new(kind: RewardKind, opts: &ScorerOptions) -> Result<Self> {
        let cfg_err = |m: String| Error::config("task", m);
        Ok(match kind {
            RewardKind::Math => Scorer::Math(MathVerifier::default()),
            RewardKind::Exact => Scorer::Exact,
            RewardKind::Choice => Scorer::Choice,
            RewardKind::Numeric => Scorer::Numeric(opts.tolerance),
            RewardKind::Regex => {
                let pattern = opts.answer_regex.as_deref().ok_or_else(|| {
                    cfg_err("task.reward = \"regex\" needs task.answer_regex".into())
                })?;
                Scorer::Regex(compile_answer_regex(pattern).map_err(cfg_err)?)
            }
            RewardKind::External => {
                let ext = opts.external.clone().ok_or_else(|| {
                    cfg_err(
                        "task.reward = \"external\" needs [task.external] with command = \
                         [program, args...]"
                            .into(),
                    )
                })?;
                let cmd = ExternalCommandReward::new(ext)
                    .map_err(|e| cfg_err(format!("task.external: {e}")))?;
                Scorer::External(Box::new(Mutex::new(cmd)))
            }
            RewardKind::Pipeline => {
                return Err(cfg_err(
                    "task.check: \"pipeline\" is not a correctness check; use one of math, \
                     exact, choice, numeric, regex, external"
                        .into(),
                ))
            }
        })
    }

    /// Why `reference` cannot be an answer for this scorer (checked for every row at load).
    pub fn check_reference(&self, reference: &str) -> std::result::Result<(), String> {
        match self {
            Scorer::Choice if reference_letter(reference).is_none() => Err(format!(
                "expected a choice letter A-Z (\"B\", \"(B)\"), found {reference:?}"
            )),
            Scorer::Numeric(_) if parse_number(reference.trim()).is_none() => {
                Err(format!("expected a number, found {reference:?}"))
            }
            _ if reference.trim().is_empty() => Err("the answer is empty".into()),
            _ => Ok(()),
        }
    }

    /// Scores one response to `prompt` against `reference`.
    pub fn score(
        &self,
        prompt: &str,
        response: &str,
        finished: bool,
        reference: &str,
    ) -> Result<Verdict> {
        Ok(match self {
            Scorer::Math(v) => math(v, response, finished, reference),
            Scorer::Exact => exact_trimmed(response, finished, reference),
            Scorer::Choice => choice(response, finished, reference),
            Scorer::Numeric(tol) => numeric(response, finished, reference, *tol),
            Scorer::Regex(re) => regex_answer(re, response, reference),
            Scorer::External(cmd) => {
                let req = RewardRequest {
                    prompt: prompt.to_string(),
                    response: response.to_string(),
                    references: vec![reference.to_string()],
                    metadata: json!({ "finished": finished }),
                };
                let mut cmd = cmd.lock().map_err(|_| {
                    Error::Internal("the external reward command's lock was poisoned".into())
                })?;
                let score = cmd.score(&req)?;
                Verdict {
                    score,
                    reason: format!("external command: {score}"),
                    extracted: None,
                }
            }
        })
    }
}

/// The math verifier; a cut-off response counts only with a marked answer.
pub fn math(verifier: &MathVerifier, response: &str, finished: bool, reference: &str) -> Verdict {
    if finished {
        return verifier.verify(response, reference);
    }
    // The last-number fallback would score whatever number the reasoning had reached.
    let strict = MathVerifier {
        last_number_fallback: false,
        ..verifier.clone()
    };
    let mut v = strict.verify(response, reference);
    if v.extracted.is_none() {
        v.reason = "truncated (no EOS) and no marked answer".to_string();
    }
    v
}

/// Exact match after trimming both sides, ended with EOS.
pub fn exact_trimmed(response: &str, finished: bool, reference: &str) -> Verdict {
    exact_answer(response.trim(), finished, reference.trim())
}

/// The letter of a reference answer: `B`, `(B)`, `B.`, `b`.
pub fn reference_letter(reference: &str) -> Option<char> {
    let t = reference.trim().trim_end_matches('.');
    let t = t
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or(t);
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => Some(c.to_ascii_uppercase()),
        _ => None,
    }
}

fn choice_patterns() -> &'static [Regex; 3] {
    static PATTERNS: std::sync::OnceLock<[Regex; 3]> = std::sync::OnceLock::new();
    PATTERNS.get_or_init(|| {
        [
            // "the answer is (B)", "Answer: B", "answer is option C"
            Regex::new(r"(?i:answer)\s*(?:(?i:is)\s*|:\s*)?(?:(?i:option)\s*)?\(?([A-Z])\b")
                .expect("literal regex"),
            Regex::new(r"\(([A-Z])\)").expect("literal regex"),
            Regex::new(r"^\s*\(?([A-Z])(?:[).:]|\s*$)").expect("literal regex"),
        ]
    })
}

/// The chosen letter and which rule found it (`marked`, `parenthesized`, `leading`); only the
/// marked rule applies to a cut-off response.
pub fn choice_letter(response: &str, finished: bool) -> Option<(char, &'static str)> {
    let [marked, paren, leading] = choice_patterns();
    let last = |re: &Regex| {
        re.captures_iter(response)
            .last()
            .and_then(|c| c.get(1))
            .and_then(|m| m.as_str().chars().next())
    };
    if let Some(c) = last(marked) {
        return Some((c, "marked"));
    }
    if !finished {
        return None;
    }
    if let Some(c) = last(paren) {
        return Some((c, "parenthesized"));
    }
    last(leading).map(|c| (c, "leading"))
}

pub fn choice(response: &str, finished: bool, reference: &str) -> Verdict {
    let Some(want) = reference_letter(reference) else {
        return fail(
            format!("reference {reference:?} is not a choice letter"),
            None,
        );
    };
    match choice_letter(response, finished) {
        None if !finished => fail("truncated (no EOS) and no marked answer".into(), None),
        None => fail("no choice letter found".into(), None),
        Some((got, rule)) if got == want => Verdict {
            score: 1.0,
            reason: format!("correct: {got} ({rule})"),
            extracted: Some(got.to_string()),
        },
        Some((got, rule)) => fail(
            format!("chose {got} ({rule}), expected {want}"),
            Some(got.to_string()),
        ),
    }
}

/// A number as written: optional sign, digits with optional comma groups, optional decimals
/// and exponent.
pub fn parse_number(text: &str) -> Option<f64> {
    let cleaned: String = text.chars().filter(|&c| c != ',').collect();
    if cleaned.is_empty()
        || cleaned.contains(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
    {
        return None;
    }
    cleaned.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// The last number in `text` and its text. A `-` right after a letter or digit is an operator
/// (`5-3` ends in 3), not a sign.
pub fn last_number(text: &str) -> Option<(f64, String)> {
    static NUMBER: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = NUMBER.get_or_init(|| {
        Regex::new(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?").expect("literal regex")
    });
    let m = re.find_iter(text).last()?;
    let mut s = m.as_str();
    let before = text[..m.start()].chars().next_back();
    if s.starts_with('-') && before.is_some_and(|c| c.is_alphanumeric()) {
        s = &s[1..];
    }
    parse_number(s).map(|x| (x, s.to_string()))
}

pub fn numeric(response: &str, finished: bool, reference: &str, tol: Tolerance) -> Verdict {
    let Some(want) = parse_number(reference.trim()) else {
        return fail(format!("reference {reference:?} is not a number"), None);
    };
    if !finished {
        return fail("truncated (no EOS)".into(), None);
    }
    let Some((got, text)) = last_number(response) else {
        return fail("no number found".into(), None);
    };
    let allowed = tol.absolute.max(tol.relative * want.abs());
    let diff = (got - want).abs();
    if diff <= allowed {
        Verdict {
            score: 1.0,
            reason: format!("correct: {text} within {allowed} of {want}"),
            extracted: Some(text),
        }
    } else {
        fail(
            format!("{text} is {diff} from {want} (allowed {allowed})"),
            Some(text),
        )
    }
}

/// The first capture group of the last match of `re`, trimmed, against the reference.
pub fn regex_answer(re: &Regex, response: &str, reference: &str) -> Verdict {
    let found = re
        .captures_iter(response)
        .last()
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().trim().to_string());
    match found {
        None => fail(format!("no match of {:?}", re.as_str()), None),
        Some(got) if got == reference.trim() => Verdict {
            score: 1.0,
            reason: format!("correct: {got}"),
            extracted: Some(got),
        },
        Some(got) => fail(
            format!("matched {got:?}, expected {:?}", reference.trim()),
            Some(got),
        ),
    }
}

fn fail(reason: String, extracted: Option<String>) -> Verdict {
    Verdict {
        score: 0.0,
        reason,
        extracted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_lists_them() {
        for r in REWARDS {
            assert_eq!(RewardKind::parse(r.name).unwrap(), r.kind);
            assert_eq!(r.kind.name(), r.name);
        }
        assert_eq!(
            RewardKind::parse("f1").unwrap_err(),
            "unknown reward \"f1\"; known: math, exact, choice, numeric, regex, external, pipeline"
        );
    }

    /// docs/tasks.md shows the table generated from REWARDS and FORMATS, word for word.
    #[test]
    fn docs_list_every_reward_and_format() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/tasks.md")).unwrap();
        for (marker, want) in [
            ("rewards", rewards_markdown()),
            ("formats", crate::task::rows::formats_markdown()),
        ] {
            let begin = format!("<!-- {marker}:begin -->\n");
            let end = format!("<!-- {marker}:end -->");
            let found = doc
                .split_once(&begin)
                .and_then(|(_, rest)| rest.split_once(&end))
                .map(|(table, _)| table);
            assert_eq!(
                found,
                Some(want.as_str()),
                "docs/tasks.md {marker} table:\n{want}"
            );
        }
    }

    #[test]
    fn exact_trims_and_needs_eos() {
        assert_eq!(exact_trimmed(" 46 ", true, "46").score, 1.0);
        assert_eq!(exact_trimmed("46", false, "46").score, 0.0);
        assert_eq!(exact_trimmed("4 6", true, "46").score, 0.0);
    }

    #[test]
    fn choice_letters_by_hand() {
        let s = |r: &str, f: bool| choice(r, f, "B").score;
        assert_eq!(s("The answer is (B).", true), 1.0);
        assert_eq!(s("answer: B", true), 1.0);
        assert_eq!(s("Answer is option B because", true), 1.0);
        assert_eq!(s("(A) looks wrong, (B) fits", true), 1.0);
        assert_eq!(s("B. Paris", true), 1.0);
        assert_eq!(s("B)", true), 1.0);
        assert_eq!(s(" B ", true), 1.0);
        // The last marked answer wins over earlier ones and over parentheses.
        assert_eq!(s("answer is A... no, the answer is B (C)", true), 1.0);
        assert_eq!(s("The answer is (C)", true), 0.0);
        // "a" is an article, not a choice; a lone capital inside a word is not one either.
        assert_eq!(s("answer is a bit unclear", true), 0.0);
        assert_eq!(s("Because of Bob", true), 0.0);
        // Cut off: only a marked answer counts.
        assert_eq!(s("(B) seems", false), 0.0);
        assert_eq!(s("so the answer is B and", false), 1.0);
        assert_eq!(choice("(B)", true, "(b)").score, 1.0);
        assert_eq!(reference_letter("(C)."), Some('C'));
        assert_eq!(reference_letter("CD"), None);
        let v = choice("Answer: D", true, "B");
        assert_eq!(
            (v.reason.as_str(), v.extracted.as_deref()),
            ("chose D (marked), expected B", Some("D"))
        );
    }

    #[test]
    fn numeric_last_number_within_tolerance() {
        let tol = Tolerance::default();
        assert_eq!(numeric("12+34=46", true, "46", tol).score, 1.0);
        assert_eq!(numeric("so 1,000 apples", true, "1000", tol).score, 1.0);
        assert_eq!(numeric("x = -2.5", true, "-2.5", tol).score, 1.0);
        assert_eq!(numeric("5-3", true, "3", tol).score, 1.0); // operator, not a sign
        assert_eq!(numeric("46", false, "46", tol).score, 0.0); // cut off
        assert_eq!(numeric("none", true, "46", tol).score, 0.0);
        assert_eq!(numeric("3.14159", true, "3.14", tol).score, 0.0);
        // Absolute 0.01: |3.14159 - 3.14| = 0.00159 passes; relative 1% of 200 = 2.
        let abs = Tolerance {
            absolute: 0.01,
            relative: 0.0,
        };
        assert_eq!(numeric("3.14159", true, "3.14", abs).score, 1.0);
        let rel = Tolerance {
            absolute: 0.0,
            relative: 0.01,
        };
        assert_eq!(numeric("about 201.9", true, "200", rel).score, 1.0);
        assert_eq!(numeric("about 202.1", true, "200", rel).score, 0.0);
        assert_eq!(last_number("1e3 or 2E-2").unwrap().0, 0.02);
        assert_eq!(parse_number("12a"), None);
    }

    #[test]
    fn regex_takes_the_last_match_group() {
        let re = compile_answer_regex(r"ANSWER:\s*(\S+)").unwrap();
        assert_eq!(
            regex_answer(&re, "ANSWER: 3 then ANSWER: 46 ", "46").score,
            1.0
        );
        assert_eq!(regex_answer(&re, "ANSWER: 45", "46").score, 0.0);
        assert_eq!(
            regex_answer(&re, "46", "46").reason,
            "no match of \"ANSWER:\\\\s*(\\\\S+)\""
        );
        assert!(compile_answer_regex("no group")
            .unwrap_err()
            .contains("no capture group"));
        assert!(compile_answer_regex("(")
            .unwrap_err()
            .contains("task.answer_regex"));
    }

    #[test]
    fn math_cut_off_needs_a_marked_answer() {
        let v = MathVerifier::default();
        assert_eq!(math(&v, "9 * 2 = 18", true, "18").score, 1.0);
        let cut = math(&v, "9 * 2 = 18", false, "18");
        assert_eq!(cut.score, 0.0);
        assert_eq!(cut.reason, "truncated (no EOS) and no marked answer");
        assert_eq!(math(&v, "#### 18", false, "18").score, 1.0);
    }

    #[test]
    fn references_are_checked_per_scorer() {
        assert!(Scorer::Choice.check_reference("B").is_ok());
        assert!(Scorer::Choice.check_reference("Paris").is_err());
        let n = Scorer::Numeric(Tolerance::default());
        assert!(n.check_reference("1,000").is_ok());
        assert_eq!(
            n.check_reference("ten").unwrap_err(),
            "expected a number, found \"ten\""
        );
        assert_eq!(
            Scorer::Exact.check_reference(" ").unwrap_err(),
            "the answer is empty"
        );
        let e = Scorer::new(RewardKind::Regex, &ScorerOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("needs task.answer_regex"), "{e}");
    }

    #[test]
    fn external_scores_through_the_command() {
        let opts = ScorerOptions {
            external: Some(ExternalConfig::new(vec![
                "sh".into(),
                "-c".into(),
                "while read l; do case \"$l\" in *'\"46\"'*) echo 1;; *) echo 0;; esac; done"
                    .into(),
            ])),
            ..Default::default()
        };
        let s = Scorer::new(RewardKind::External, &opts).unwrap();
        assert_eq!(s.score("12+34=", "46", true, "46").unwrap().score, 1.0);
        assert_eq!(s.score("12+34=", "45", true, "47").unwrap().score, 0.0);
    }
}

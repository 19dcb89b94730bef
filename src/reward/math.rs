//! Math answer verifier (ALGORITHMS.md §3 "Verifiers").
//!
//! [`MathVerifier::verify`] extracts a final answer from a model response, normalises it and the
//! reference, and decides equivalence. The score is 1.0 (correct) or 0.0, with a reason.
//!
//! Extraction, in priority order (the first that yields a non-empty answer wins):
//! 1. the text after the last `####` (GSM8K style), up to the end of that line; a `####`
//!    followed by a word is a markdown heading (`#### Step 1`) and is skipped;
//! 2. the content of the LAST `\boxed{...}` / `\fbox{...}` (nested braces; `\boxed 5` too);
//! 3. the last `Answer: ...` / `The answer is ...` line;
//! 4. the last number in the response (switch off with `last_number_fallback = false`).
//!
//! Equivalence, after normalisation (see [`normalize_answer`]):
//! exact string match; unions of intervals (`\cup`), tuples, intervals, sets and matrices
//! element-wise (intervals need matching brackets; bare comma lists and `\{...\}` sets ignore
//! order); and numbers via a small recursive-descent evaluator over `+ - * / ^`, parentheses,
//! `\frac`, `\sqrt`, `\pi` and implicit multiplication. Rationals are compared exactly (i128);
//! values involving `\sqrt`/`\pi`, or a non-terminating fraction against a decimal, are compared
//! with relative tolerance `rel_tol` (default 1e-6, so 0.3333333 == 1/3 but 0.3333 != 1/3).
//! An integer written directly before a digit-only `\frac` is a mixed number: `1\frac{4}{5}` = 9/5.
//!
//! Robustness: the verifier never panics, and its work is bounded on any input: only the last
//! `max_scan_bytes` of a response are scanned, answers longer than [`MAX_ANSWER_BYTES`] are
//! ignored, only expressions up to [`MAX_EXPR_BYTES`] are evaluated, the evaluator's recursion is
//! capped at [`MAX_EVAL_DEPTH`], and literals with more than [`MAX_EXACT_DIGITS`] digits are read
//! as floating point.

use std::f64::consts::PI;

/// Longest extracted answer (bytes) that is considered at all; longer candidates are skipped.
pub const MAX_ANSWER_BYTES: usize = 1024;
/// Longest normalised answer (bytes) handed to the numeric evaluator.
pub const MAX_EXPR_BYTES: usize = 256;
/// Deepest nesting the numeric evaluator follows before giving up.
pub const MAX_EVAL_DEPTH: usize = 48;
/// Most significant digits read exactly into an i128 rational (10^36 < i128::MAX ≈ 1.7e38).
pub const MAX_EXACT_DIGITS: usize = 36;
/// Longest run of number characters the last-number fallback accepts.
const MAX_NUMBER_CHARS: usize = 100;
/// How many `\boxed` occurrences (from the last backwards) are tried before giving up.
const MAX_BOXED_TRIES: usize = 8;
/// How many `####` occurrences (from the last backwards) are tried before giving up.
const MAX_HASH_TRIES: usize = 8;
/// How many `answer` occurrences (from the last backwards) are tried before giving up.
const MAX_ANSWER_LINE_TRIES: usize = 16;
/// Most `\text{...}`-like commands unwrapped in one answer.
const MAX_TEXT_COMMANDS: usize = 32;
/// Most elements compared in a tuple, interval, set or matrix.
const MAX_LIST_ELEMENTS: usize = 64;
/// Deepest nesting of lists (tuples of tuples, ...) compared element-wise.
const MAX_LIST_DEPTH: usize = 4;
/// Most list elements, over all nesting levels, parsed from one answer.
const MAX_TOTAL_ELEMENTS: usize = 128;
/// Longest string shown in a verdict's reason (characters).
const MAX_REASON_CHARS: usize = 80;

pub use super::Verdict;

/// Where in the response an answer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    /// After `####`.
    Hashes,
    /// Inside the last `\boxed{}` or `\fbox{}`.
    Boxed,
    /// On an `Answer: ...` / `The answer is ...` line.
    AnswerLine,
    /// The last number in the response.
    LastNumber,
}

/// An answer extracted from a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The raw answer text, trimmed.
    pub text: String,
    /// Which extraction rule found it.
    pub source: AnswerSource,
}

/// Verifier for math answers (GSM8K `#### n`, MATH `\boxed{}`).
#[derive(Debug, Clone, PartialEq)]
pub struct MathVerifier {
    /// Fall back to the last number in the response when no marked answer is found.
    pub last_number_fallback: bool,
    /// Relative tolerance for inexact comparisons (`\sqrt`, `\pi`, non-terminating fractions).
    pub rel_tol: f64,
    /// Only the last this-many bytes of a response are scanned for an answer.
    pub max_scan_bytes: usize,
}

impl Default for MathVerifier {
    fn default() -> Self {
        Self {
            last_number_fallback: true,
            rel_tol: 1e-6,
            max_scan_bytes: 32 * 1024,
        }
    }
}

impl MathVerifier {
    /// Scores `response` against the reference answer `reference` (an answer, not a solution).
    pub fn verify(&self, response: &str, reference: &str) -> Verdict {
        let reference_norm = normalize_answer(reference);
        let Some(found) = self.extract(response) else {
            return Verdict {
                score: 0.0,
                reason: "no answer found".to_string(),
                extracted: None,
            };
        };
        let answer_norm = normalize_answer(&found.text);
        let (score, reason) = if reference_norm.is_empty() {
            (0.0, "reference answer is empty".to_string())
        } else if answer_norm.is_empty() {
            (
                0.0,
                "extracted answer is empty after normalisation".to_string(),
            )
        } else if self.normalized_equivalent(&answer_norm, &reference_norm) {
            let (a, r) = (shorten(&answer_norm), shorten(&reference_norm));
            (1.0, format!("correct: {a} == {r}"))
        } else {
            let (a, r) = (shorten(&answer_norm), shorten(&reference_norm));
            (0.0, format!("mismatch: extracted {a} vs reference {r}"))
        };
        Verdict {
            score,
            reason,
            extracted: Some(found.text),
        }
    }

    /// Extracts the final answer from a response, trying the rules in priority order.
    pub fn extract(&self, response: &str) -> Option<Extracted> {
        let window = tail_window(response, self.max_scan_bytes);
        let found = extract_after_hashes(window)
            .map(|text| (text, AnswerSource::Hashes))
            .or_else(|| extract_last_boxed(window).map(|t| (t, AnswerSource::Boxed)))
            .or_else(|| extract_answer_line(window).map(|t| (t, AnswerSource::AnswerLine)))
            .or_else(|| {
                if self.last_number_fallback {
                    extract_last_number(window).map(|t| (t, AnswerSource::LastNumber))
                } else {
                    None
                }
            })?;
        Some(Extracted {
            text: found.0.to_string(),
            source: found.1,
        })
    }

    /// Whether two raw answers (not responses) are equivalent after normalisation.
    pub fn equivalent(&self, a: &str, b: &str) -> bool {
        self.normalized_equivalent(&normalize_answer(a), &normalize_answer(b))
    }

    fn normalized_equivalent(&self, a: &str, b: &str) -> bool {
        answers_equivalent(a, b, self.rel_tol)
    }
}

/// A canonical string for an answer, for majority voting: equivalent exact numbers map to the
/// same string (`0.5`, `\frac{1}{2}` and `2/4` all give `1/2`); other answers give their
/// normalised form.
pub fn canonical_answer(raw: &str) -> String {
    let norm = normalize_answer(raw);
    if parse_list(&norm).is_some() {
        return norm;
    }
    match evaluate(&norm) {
        Some(Value::Exact(r)) if r.den == 1 => r.num.to_string(),
        Some(Value::Exact(r)) => format!("{}/{}", r.num, r.den),
        Some(Value::Approx(x)) => format!("{x:.9e}"),
        None => norm,
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= MAX_REASON_CHARS {
        return s.to_string();
    }
    let mut out: String = s.chars().take(MAX_REASON_CHARS).collect();
    out.push('…');
    out
}

// ---------------------------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------------------------

/// The last `max_bytes` of `s`, moved forward to a char boundary. Answers sit at the end.
fn tail_window(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut start = s.len() - max_bytes;
    while start < s.len() && !s.is_char_boundary(start) {
        start += 1;
    }
    s.get(start..).unwrap_or("")
}

/// Trims whitespace, markdown emphasis and trailing periods; rejects empty or overlong answers.
fn clean_candidate(s: &str) -> Option<&str> {
    let t = s
        .trim()
        .trim_matches('*')
        .trim()
        .trim_end_matches('.')
        .trim();
    (!t.is_empty() && t.len() <= MAX_ANSWER_BYTES).then_some(t)
}

/// The answer after the last `####` that is not a markdown heading. Chat models write
/// headings like `#### Step 1: ...`; an answer never starts with a letter (`#### 18`,
/// `#### $18`, `#### -3`), so a `####` followed by a word is skipped.
fn extract_after_hashes(w: &str) -> Option<&str> {
    let mut end = w.len();
    for _ in 0..MAX_HASH_TRIES {
        let pos = w.get(..end)?.rfind("####")?;
        end = pos;
        let rest = w.get(pos + 4..)?.trim_start_matches('#');
        let line = rest.split('\n').next().unwrap_or("");
        if line.trim_start().starts_with(|c: char| c.is_alphabetic()) {
            continue;
        }
        if let Some(answer) = clean_candidate(line) {
            return Some(answer);
        }
    }
    None
}

/// Index of the `}` matching the `{` at `open`; `\{`, `\}` (escaped) do not count.
fn matching_brace(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while let Some(&c) = b.get(i) {
        match c {
            b'\\' => {
                i += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn extract_last_boxed(w: &str) -> Option<&str> {
    let mut end = w.len();
    for _ in 0..MAX_BOXED_TRIES {
        let head = w.get(..end)?;
        let boxed = head.rfind("\\boxed").map(|p| (p, "\\boxed".len()));
        let fbox = head.rfind("\\fbox").map(|p| (p, "\\fbox".len()));
        let (pos, cmd_len) = match (boxed, fbox) {
            (Some(a), Some(b)) => {
                if a.0 > b.0 {
                    a
                } else {
                    b
                }
            }
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => return None,
        };
        if let Some(content) = boxed_content(w, pos + cmd_len) {
            return Some(content);
        }
        end = pos;
    }
    None
}

/// The argument of a `\boxed` whose name ends at `after`: `{...}` or, after a space, one token.
fn boxed_content(w: &str, after: usize) -> Option<&str> {
    let b = w.as_bytes();
    let mut i = after;
    while b.get(i).is_some_and(|c| *c == b' ' || *c == b'\t') {
        i += 1;
    }
    match b.get(i) {
        Some(b'{') => {
            let close = matching_brace(b, i)?;
            clean_candidate(w.get(i + 1..close)?)
        }
        // `\boxed 5`: a space then a single token (a letter right after is another command).
        Some(_) if i > after => {
            let rest = w.get(i..)?;
            let token_end = rest
                .find(|c: char| c.is_whitespace() || c == '$')
                .unwrap_or(rest.len());
            clean_candidate(rest.get(..token_end)?)
        }
        _ => None,
    }
}

/// Last position of `needle` in `hay`, ignoring ASCII case, searching only before `end`.
fn rfind_ascii_ci(hay: &[u8], needle: &[u8], end: usize) -> Option<usize> {
    let end = end.min(hay.len());
    if needle.is_empty() || end < needle.len() {
        return None;
    }
    (0..=end - needle.len()).rev().find(|&i| {
        hay.get(i..i + needle.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(needle))
    })
}

fn extract_answer_line(w: &str) -> Option<&str> {
    let b = w.as_bytes();
    let mut end = b.len();
    for _ in 0..MAX_ANSWER_LINE_TRIES {
        let pos = rfind_ascii_ci(b, b"answer", end)?;
        end = pos;
        let mut i = pos + "answer".len();
        while b.get(i).is_some_and(|c| matches!(c, b'*' | b' ' | b'\t')) {
            i += 1;
        }
        let after_marker = match b.get(i) {
            Some(b':') => i + 1,
            Some(b'i' | b'I')
                if b.get(i + 1).is_some_and(|c| c.eq_ignore_ascii_case(&b's'))
                    && !b.get(i + 2).is_some_and(|c| c.is_ascii_alphabetic()) =>
            {
                i + 2
            }
            _ => continue,
        };
        let rest = w.get(after_marker..)?;
        let line = rest.split('\n').next().unwrap_or("");
        // A sentence ends at ". " (a decimal point is followed by a digit, not a space).
        let sentence = line.split(". ").next().unwrap_or(line);
        let cleaned = sentence.trim().trim_matches('*').trim_start_matches(':');
        if let Some(answer) = clean_candidate(cleaned) {
            return Some(answer);
        }
    }
    None
}

fn is_number_char(c: u8) -> bool {
    c.is_ascii_digit() || matches!(c, b'.' | b',' | b'/')
}

fn extract_last_number(w: &str) -> Option<&str> {
    let b = w.as_bytes();
    let last_digit = b.iter().rposition(|c| c.is_ascii_digit())?;
    let end = last_digit + 1;
    let mut start = last_digit;
    while start > 0 && b.get(start - 1).is_some_and(|c| is_number_char(*c)) {
        start -= 1;
        if end - start > MAX_NUMBER_CHARS {
            return None;
        }
    }
    if start > 0 && b.get(start - 1) == Some(&b'-') {
        start -= 1;
    }
    let token = w.get(start..end)?.trim_start_matches([',', '/']);
    // "1,2,3" is a list: keep its last element; "1,234" is a number with a separator.
    let token = if token.contains(',') && strip_thousands_separators(token).is_none() {
        token.rsplit(',').next().unwrap_or(token)
    } else {
        token
    };
    clean_candidate(token)
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

/// Longest answer that is normalised; longer input is only trimmed (keeps the work bounded).
const MAX_NORMALIZE_BYTES: usize = 4 * MAX_ANSWER_BYTES;

/// Normalises an answer string so that equal answers compare equal as strings as often as
/// possible: drops `$`, `\left`/`\right`, spacing commands, degrees, percent, trailing units
/// (`\text{ cm}^2`, `5 apples`), `\text{}` wrappers, whitespace, `x =` prefixes, thousands
/// separators, trailing periods and trailing decimal zeros; `\dfrac`/`\tfrac` become `\frac`.
pub fn normalize_answer(raw: &str) -> String {
    let trimmed = raw.trim();
    if trimmed.len() > MAX_NORMALIZE_BYTES {
        return trimmed.to_string();
    }
    let mut s = replace_unicode_symbols(trimmed);
    for (from, to) in PLAIN_REWRITES {
        if s.contains(from) {
            s = s.replace(from, to);
        }
    }
    s = remove_spacing_commands(&s);
    for (cmd, to) in COMMAND_REWRITES {
        s = replace_command(&s, cmd, to);
    }
    s = unwrap_text_commands(&s);
    s = strip_trailing_unit_words(&s);
    s.retain(|c| !c.is_whitespace());
    s = simplify_single_char_scripts(&s);
    s = strip_variable_prefix(&s).to_string();
    let s = s.trim_end_matches('.');
    let s = strip_thousands_separators(s).unwrap_or_else(|| s.to_string());
    strip_trailing_decimal_zeros(&s)
}

/// Literal substitutions applied first, in this order (`\$` before `$`, `\%` before `%`).
const PLAIN_REWRITES: [(&str, &str); 7] = [
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
    ("$", ""),
    ("\\%", ""),
    ("%", ""),
    ("~", " "),
];

/// LaTeX commands rewritten when not followed by a letter (so `\left` leaves `\leftarrow`).
const COMMAND_REWRITES: [(&str, &str); 11] = [
    ("\\left", ""),
    ("\\right", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\cfrac", "\\frac"),
    ("\\displaystyle", ""),
    ("\\circ", ""),
    ("\\degree", ""),
    ("\\qquad", " "),
    ("\\quad", " "),
    ("\\cdotp", "\\cdot"),
];

fn replace_unicode_symbols(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{2212}' => out.push('-'),
            '\u{00d7}' => out.push_str("\\times "),
            '\u{00f7}' => out.push_str("\\div "),
            '\u{03c0}' => out.push_str("\\pi "),
            '\u{221e}' => out.push_str("\\infty "),
            '\u{00b0}' => {}
            _ => out.push(c),
        }
    }
    out
}

/// Drops `\!`, `\,`, `\;`, `\:` and `\ ` but keeps `\\` (a matrix row break) intact.
fn remove_spacing_commands(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('!' | ',' | ';' | ':') => {
                chars.next();
            }
            Some(' ') => {
                chars.next();
                out.push(' ');
            }
            Some('\\') => {
                chars.next();
                out.push_str("\\\\");
            }
            _ => out.push('\\'),
        }
    }
    out
}

/// Replaces the command `cmd` (with its backslash) by `to` unless it is the prefix of a longer
/// command name.
fn replace_command(s: &str, cmd: &str, to: &str) -> String {
    if !s.contains(cmd) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        let after = rest.get(i + cmd.len()..).unwrap_or("");
        let longer_name = after
            .as_bytes()
            .first()
            .is_some_and(|c| c.is_ascii_alphabetic());
        out.push_str(rest.get(..i).unwrap_or(""));
        out.push_str(if longer_name { cmd } else { to });
        rest = after;
    }
    out.push_str(rest);
    out
}

const TEXT_COMMANDS: [&str; 10] = [
    "text",
    "textbf",
    "textit",
    "textrm",
    "textnormal",
    "mbox",
    "mathrm",
    "mathbf",
    "mathit",
    "operatorname",
];

/// Finds the first text-like command followed by `{`: (command start, brace index).
fn find_text_command(s: &str) -> Option<(usize, usize)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b.get(i) != Some(&b'\\') {
            i += 1;
            continue;
        }
        let name_start = i + 1;
        let mut name_end = name_start;
        while b.get(name_end).is_some_and(|c| c.is_ascii_alphabetic()) {
            name_end += 1;
        }
        let name = s.get(name_start..name_end).unwrap_or("");
        let mut j = name_end;
        while b.get(j) == Some(&b' ') {
            j += 1;
        }
        if TEXT_COMMANDS.contains(&name) && b.get(j) == Some(&b'{') {
            return Some((i, j));
        }
        i = name_end.max(i + 2);
    }
    None
}

/// Length of a unit exponent (`^2`, `^{2}`) at the start of `s`, else 0.
fn unit_exponent_len(s: &str) -> usize {
    let b = s.as_bytes();
    match (b.first(), b.get(1)) {
        (Some(b'^'), Some(c)) if c.is_ascii_digit() => 2,
        (Some(b'^'), Some(b'{')) => matching_brace(b, 1).map_or(0, |close| close + 1),
        _ => 0,
    }
}

/// `\text{east}` → `east`; a trailing unit after a value (`5 \text{ cm}^2`) is dropped.
fn unwrap_text_commands(s: &str) -> String {
    let mut s = s.to_string();
    for _ in 0..MAX_TEXT_COMMANDS {
        let Some((start, open)) = find_text_command(&s) else {
            break;
        };
        let Some(close) = matching_brace(s.as_bytes(), open) else {
            break;
        };
        let before = s.get(..start).unwrap_or("");
        let inner = s.get(open + 1..close).unwrap_or("").trim();
        let after = s.get(close + 1..).unwrap_or("");
        let exponent = unit_exponent_len(after);
        let after_unit = after.get(exponent..).unwrap_or("");
        let is_trailing_unit = !before.trim().is_empty()
            && inner.starts_with(|c: char| c.is_alphabetic())
            && after_unit.trim().trim_end_matches('.').is_empty();
        s = if is_trailing_unit {
            before.trim_end().to_string()
        } else {
            format!("{before}{inner}{after}")
        };
    }
    s
}

/// `18 dollars` → `18`: a leading number followed only by words.
fn strip_trailing_unit_words(s: &str) -> String {
    let Some((number, words)) = s.split_once(char::is_whitespace) else {
        return s.to_string();
    };
    let is_number = number.bytes().any(|c| c.is_ascii_digit())
        && number
            .bytes()
            .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'.' | b','));
    let words = words.trim().trim_end_matches('.');
    let only_words = words.starts_with(|c: char| c.is_alphabetic())
        && words.chars().all(|c| c.is_alphabetic() || c == ' ');
    if is_number && only_words {
        number.to_string()
    } else {
        s.to_string()
    }
}

/// `x^{2}` → `x^2`, `4210_{5}` → `4210_5`: braces around one character mean nothing.
fn simplify_single_char_scripts(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if let Some(&[script @ (b'^' | b'_'), b'{', c, b'}']) = b.get(i..i + 4) {
            if c.is_ascii_alphanumeric() {
                out.push(char::from(script));
                out.push(char::from(c));
                i += 4;
                continue;
            }
        }
        // Copy one whole char (multi-byte chars are copied via their str slice).
        let width = s
            .get(i..)
            .and_then(|r| r.chars().next())
            .map_or(1, char::len_utf8);
        out.push_str(s.get(i..i + width).unwrap_or(""));
        i += width;
    }
    out
}

/// `x=5` → `5`, `x\in[-2,7]` → `[-2,7]` when the left side is a single letter or command.
fn strip_variable_prefix(s: &str) -> &str {
    let is_variable = |lhs: &str| {
        let name = lhs.strip_prefix('\\').unwrap_or(lhs);
        !name.is_empty()
            && name.bytes().all(|c| c.is_ascii_alphabetic())
            && (name.len() == 1 || lhs.starts_with('\\'))
    };
    if let Some((lhs, rhs)) = s.split_once("\\in") {
        let is_set_membership = !rhs.starts_with(|c: char| c.is_ascii_alphabetic());
        if is_variable(lhs) && is_set_membership && !rhs.is_empty() {
            return rhs;
        }
    }
    if s.matches('=').count() == 1 {
        if let Some((lhs, rhs)) = s.split_once('=') {
            if is_variable(lhs) && !rhs.is_empty() {
                return rhs;
            }
        }
    }
    s
}

/// `1,234,567.5` → `1234567.5` when the whole answer is one number with comma groups of three.
/// Anything else (`(1,2)`, `3,5,7`, `1,2345`) is left alone (returns `None`).
fn strip_thousands_separators(s: &str) -> Option<String> {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int_part, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    if frac.is_some_and(|f| f.is_empty() || !f.bytes().all(|c| c.is_ascii_digit())) {
        return None;
    }
    let mut groups = int_part.split(',');
    let first = groups.next()?;
    let first_ok = (1..=3).contains(&first.len()) && first.bytes().all(|c| c.is_ascii_digit());
    let mut rest_count = 0;
    for g in groups {
        if g.len() != 3 || !g.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        rest_count += 1;
    }
    (first_ok && rest_count > 0).then(|| s.replace(',', ""))
}

/// `5.00` → `5`, `2.50` → `2.5` for a plain decimal literal; anything else unchanged.
fn strip_trailing_decimal_zeros(s: &str) -> String {
    let body = s.strip_prefix('-').unwrap_or(s);
    let is_decimal = body.contains('.')
        && body.bytes().filter(|c| *c == b'.').count() == 1
        && body.bytes().any(|c| c.is_ascii_digit())
        && body.bytes().all(|c| c.is_ascii_digit() || c == b'.');
    if !is_decimal {
        return s.to_string();
    }
    let trimmed = s.trim_end_matches('0').trim_end_matches('.');
    match trimmed {
        "" | "-" => "0".to_string(),
        t => t.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Equivalence
// ---------------------------------------------------------------------------------------------

fn answers_equivalent(a: &str, b: &str, rel_tol: f64) -> bool {
    if a == b {
        return true;
    }
    if a.len() > MAX_NORMALIZE_BYTES || b.len() > MAX_NORMALIZE_BYTES {
        return false; // too long to parse: only the exact string match above applies
    }
    // Parse each side once; comparisons then never re-parse (unordered matching is quadratic).
    let (mut budget_a, mut budget_b) = (MAX_TOTAL_ELEMENTS, MAX_TOTAL_ELEMENTS);
    let parsed_a = parse_answer(a, 0, &mut budget_a);
    let parsed_b = parse_answer(b, 0, &mut budget_b);
    same_answer(&parsed_a, &parsed_b, rel_tol)
}

/// A normalised answer, parsed once.
#[derive(Debug)]
enum Answer<'a> {
    Number(Value),
    /// Anything that is not a number or a list; compared as a string.
    Text(&'a str),
    List(ListKind, Vec<Answer<'a>>),
    /// Pieces joined by `\cup`, compared in order.
    Union(Vec<Answer<'a>>),
}

/// Takes `n` from the element budget; false (and nothing taken) when it would run out.
fn take_budget(budget: &mut usize, n: usize) -> bool {
    if n > *budget {
        return false;
    }
    *budget -= n;
    true
}

/// Parses a normalised answer into numbers, lists and unions; over the depth or element
/// budget, the rest is kept as text (so very large answers still compare as strings).
fn parse_answer<'a>(s: &'a str, depth: usize, budget: &mut usize) -> Answer<'a> {
    if depth < MAX_LIST_DEPTH {
        if s.contains("\\cup") {
            let parts: Vec<&str> = s.split("\\cup").collect();
            if parts.len() > MAX_LIST_ELEMENTS || !take_budget(budget, parts.len()) {
                return Answer::Text(s);
            }
            let items = parts
                .into_iter()
                .map(|p| parse_answer(p, depth + 1, budget))
                .collect();
            return Answer::Union(items);
        }
        if let Some(list) = parse_list(s) {
            if !take_budget(budget, list.elements.len()) {
                return Answer::Text(s);
            }
            let items = list
                .elements
                .into_iter()
                .map(|e| parse_answer(e, depth + 1, budget))
                .collect();
            return Answer::List(list.kind, items);
        }
    }
    match evaluate(s) {
        Some(v) => Answer::Number(v),
        None => Answer::Text(s),
    }
}

fn same_answer(a: &Answer<'_>, b: &Answer<'_>, rel_tol: f64) -> bool {
    let all_in_order = |xs: &[Answer<'_>], ys: &[Answer<'_>]| {
        xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same_answer(x, y, rel_tol))
    };
    match (a, b) {
        (Answer::Number(x), Answer::Number(y)) => values_equal(*x, *y, rel_tol),
        (Answer::Text(x), Answer::Text(y)) => x == y,
        (Answer::Union(xs), Answer::Union(ys)) => all_in_order(xs, ys),
        (Answer::List(kx, xs), Answer::List(ky, ys)) if kx == ky => match kx {
            ListKind::Bracketed(..) | ListKind::Matrix => all_in_order(xs, ys),
            ListKind::Set | ListKind::Bare => same_multiset(xs, ys, rel_tol),
        },
        _ => false,
    }
}

/// Whether every element of `xs` pairs with a distinct equivalent element of `ys`. Greedy
/// pairing is exact when equivalence is transitive (it is, except at the tolerance edge).
fn same_multiset(xs: &[Answer<'_>], ys: &[Answer<'_>], rel_tol: f64) -> bool {
    if xs.len() != ys.len() {
        return false;
    }
    let mut used = vec![false; ys.len()];
    xs.iter().all(|x| {
        let hit = ys
            .iter()
            .zip(used.iter_mut())
            .find(|(y, taken)| !**taken && same_answer(x, y, rel_tol));
        match hit {
            Some((_, taken)) => {
                *taken = true;
                true
            }
            None => false,
        }
    })
}

/// How a list is delimited; intervals and tuples must use the same brackets to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListKind {
    /// `(a,b)`, `[a,b)`, ...: ordered, brackets must match.
    Bracketed(u8, u8),
    /// `\{a,b\}`: a set, order ignored.
    Set,
    /// `a,b`: a bare list of values (e.g. all solutions), order ignored.
    Bare,
    /// `\begin{pmatrix}...\end{pmatrix}` (or bmatrix): ordered, rows flattened.
    Matrix,
}

#[derive(Debug)]
struct List<'a> {
    kind: ListKind,
    elements: Vec<&'a str>,
}

/// Splits `s` at top-level occurrences of the separators (outside (), [], {}).
fn split_top_level<'a>(s: &'a str, separators: &[&str]) -> Option<Vec<&'a str>> {
    let b = s.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0i64;
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b.get(i).copied().unwrap_or(0);
        if depth == 0 {
            if let Some(sep) = separators
                .iter()
                .find(|sep| b.get(i..i + sep.len()) == Some(sep.as_bytes()))
            {
                parts.push(s.get(start..i)?);
                i += sep.len();
                start = i;
                if parts.len() > MAX_LIST_ELEMENTS {
                    return None;
                }
                continue;
            }
        }
        match c {
            b'\\' => {
                // `\{` and `\}` are set braces, not grouping; skip the escaped char.
                i += 2;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    parts.push(s.get(start..)?);
    Some(parts)
}

/// True when the bracket opened at byte 0 closes exactly at the last byte.
fn outer_brackets_enclose_all(s: &str) -> bool {
    let b = s.as_bytes();
    let mut depth = 0i64;
    for (i, c) in b.iter().enumerate() {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 && i + 1 != b.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

fn parse_list(s: &str) -> Option<List<'_>> {
    for (begin, end) in [
        ("\\begin{pmatrix}", "\\end{pmatrix}"),
        ("\\begin{bmatrix}", "\\end{bmatrix}"),
    ] {
        if let Some(inner) = s.strip_prefix(begin).and_then(|r| r.strip_suffix(end)) {
            let elements = split_top_level(inner, &["\\\\", "&"])?;
            return Some(List {
                kind: ListKind::Matrix,
                elements,
            });
        }
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        let elements = split_top_level(inner, &[","])?;
        return Some(List {
            kind: ListKind::Set,
            elements,
        });
    }
    let b = s.as_bytes();
    let (first, last) = (*b.first()?, *b.last()?);
    if matches!(first, b'(' | b'[')
        && matches!(last, b')' | b']')
        && s.len() >= 2
        && outer_brackets_enclose_all(s)
    {
        let inner = s.get(1..s.len() - 1)?;
        let elements = split_top_level(inner, &[","])?;
        // `(5)` is a parenthesised number, not a 1-tuple.
        return (elements.len() >= 2).then_some(List {
            kind: ListKind::Bracketed(first, last),
            elements,
        });
    }
    let elements = split_top_level(s, &[","])?;
    (elements.len() >= 2).then_some(List {
        kind: ListKind::Bare,
        elements,
    })
}

// ---------------------------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------------------------

/// A reduced fraction num/den with den > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ratio {
    num: i128,
    den: i128,
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    // Works on non-negative values; callers pass unsigned_abs-safe magnitudes.
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a.abs()
}

impl Ratio {
    fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 || num == i128::MIN || den == i128::MIN {
            return None;
        }
        let g = gcd(num.abs(), den.abs()).max(1);
        let sign = if den < 0 { -1 } else { 1 };
        Some(Self {
            num: sign * num / g,
            den: sign * den / g,
        })
    }

    fn int(n: i128) -> Self {
        Self { num: n, den: 1 }
    }

    fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }

    fn add(self, o: Self) -> Option<Self> {
        let num = self
            .num
            .checked_mul(o.den)?
            .checked_add(o.num.checked_mul(self.den)?)?;
        Self::new(num, self.den.checked_mul(o.den)?)
    }

    fn mul(self, o: Self) -> Option<Self> {
        // Cross-reduce first to delay overflow.
        let g1 = gcd(self.num.abs(), o.den).max(1);
        let g2 = gcd(o.num.abs(), self.den).max(1);
        Self::new(
            (self.num / g1).checked_mul(o.num / g2)?,
            (self.den / g2).checked_mul(o.den / g1)?,
        )
    }

    fn recip(self) -> Option<Self> {
        Self::new(self.den, self.num)
    }

    fn pow(self, exp: i128) -> Option<Self> {
        let base = if exp < 0 { self.recip()? } else { self };
        let mut e = exp.unsigned_abs();
        let (mut acc, mut sq) = (Self::int(1), base);
        while e > 0 {
            if e & 1 == 1 {
                acc = acc.mul(sq)?;
            }
            e >>= 1;
            if e > 0 {
                sq = sq.mul(sq)?;
            }
        }
        Some(acc)
    }

    /// Whether the decimal expansion terminates (den = 2^a 5^b).
    fn is_terminating(self) -> bool {
        let mut d = self.den;
        while d % 2 == 0 {
            d /= 2;
        }
        while d % 5 == 0 {
            d /= 5;
        }
        d == 1
    }
}

/// A number: exact when it can be, floating point when it must be.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    Exact(Ratio),
    Approx(f64),
}

impl Value {
    fn to_f64(self) -> f64 {
        match self {
            Value::Exact(r) => r.to_f64(),
            Value::Approx(x) => x,
        }
    }

    /// Applies an exact operation, falling back to floating point on overflow.
    fn combine(
        self,
        o: Value,
        exact: fn(Ratio, Ratio) -> Option<Ratio>,
        approx: fn(f64, f64) -> f64,
    ) -> Option<Value> {
        if let (Value::Exact(a), Value::Exact(b)) = (self, o) {
            if let Some(r) = exact(a, b) {
                return Some(Value::Exact(r));
            }
        }
        finite(approx(self.to_f64(), o.to_f64()))
    }

    fn add(self, o: Value) -> Option<Value> {
        self.combine(o, Ratio::add, |a, b| a + b)
    }

    fn sub(self, o: Value) -> Option<Value> {
        self.add(o.neg())
    }

    fn mul(self, o: Value) -> Option<Value> {
        self.combine(o, Ratio::mul, |a, b| a * b)
    }

    fn div(self, o: Value) -> Option<Value> {
        if o.to_f64() == 0.0 {
            return None;
        }
        self.combine(o, |a, b| a.mul(b.recip()?), |a, b| a / b)
    }

    fn neg(self) -> Value {
        match self {
            Value::Exact(r) => Value::Exact(Ratio {
                num: -r.num,
                den: r.den,
            }),
            Value::Approx(x) => Value::Approx(-x),
        }
    }

    fn pow(self, e: Value) -> Option<Value> {
        if let (Value::Exact(b), Value::Exact(x)) = (self, e) {
            // Exact powers only for small integer exponents; larger ones overflow anyway.
            if x.den == 1 && x.num.abs() <= 256 {
                if let Some(r) = b.pow(x.num) {
                    return Some(Value::Exact(r));
                }
            }
            if x.den == 2 {
                // b^(n/2) = sqrt(b)^n, exact for perfect squares.
                return self.root(2)?.pow(Value::Exact(Ratio::int(x.num)));
            }
        }
        finite(self.to_f64().powf(e.to_f64()))
    }

    fn root(self, n: u32) -> Option<Value> {
        if let Value::Exact(r) = self {
            if let (Some(num), Some(den)) = (exact_root(r.num, n), exact_root(r.den, n)) {
                return Ratio::new(num, den).map(Value::Exact);
            }
        }
        let x = self.to_f64();
        if x < 0.0 && n.is_multiple_of(2) {
            return None;
        }
        let root = x.abs().powf(1.0 / f64::from(n));
        finite(if x < 0.0 { -root } else { root })
    }
}

fn finite(x: f64) -> Option<Value> {
    x.is_finite().then_some(Value::Approx(x))
}

/// The integer n-th root of `v` when `v` is a perfect n-th power.
fn exact_root(v: i128, n: u32) -> Option<i128> {
    if v < 0 && n.is_multiple_of(2) {
        return None;
    }
    let magnitude = v.checked_abs()?;
    let guess = (magnitude as f64).powf(1.0 / f64::from(n)).round() as i128;
    let sign = if v < 0 { -1 } else { 1 };
    (guess.saturating_sub(1).max(0)..=guess.saturating_add(1))
        .find(|r| r.checked_pow(n) == Some(magnitude))
        .map(|r| sign * r)
}

fn values_equal(a: Value, b: Value, rel_tol: f64) -> bool {
    let close = |x: f64, y: f64| {
        let diff = (x - y).abs();
        x.is_finite() && y.is_finite() && (diff <= rel_tol * x.abs().max(y.abs()) || diff <= 1e-12)
    };
    match (a, b) {
        (Value::Exact(x), Value::Exact(y)) => {
            // A non-terminating fraction can only be written approximately as a decimal.
            x == y || (x.is_terminating() != y.is_terminating() && close(x.to_f64(), y.to_f64()))
        }
        _ => close(a.to_f64(), b.to_f64()),
    }
}

/// Evaluates a normalised answer as a number, if it is one.
fn evaluate(s: &str) -> Option<Value> {
    if s.is_empty() || s.len() > MAX_EXPR_BYTES || !s.is_ascii() {
        return None;
    }
    let mut p = Parser {
        s: s.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let v = p.expr()?;
    (p.pos == p.s.len()).then_some(v)
}

/// Recursive-descent evaluator:
/// expr := term (('+'|'-') term)* ; term := unary (('*'|'/'|\cdot|\times|\div)? unary)* ;
/// unary := ('-'|'+') unary | power ; power := primary ('^' unary)? ;
/// primary := number [mixed \frac] | '(' expr ')' | '{' expr '}' | \frac a b | \sqrt[n] a | \pi.
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Consumes `\name` if it is next and not the prefix of a longer command.
    fn eat_command(&mut self, name: &str) -> bool {
        let end = self.pos + 1 + name.len();
        let matches = self.peek() == Some(b'\\')
            && self.s.get(self.pos + 1..end) == Some(name.as_bytes())
            && !self.s.get(end).is_some_and(|c| c.is_ascii_alphabetic());
        if matches {
            self.pos = end;
        }
        matches
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_EVAL_DEPTH).then_some(())
    }

    fn expr(&mut self) -> Option<Value> {
        self.enter()?;
        let mut acc = self.term()?;
        loop {
            if self.eat(b'+') {
                acc = acc.add(self.term()?)?;
            } else if self.eat(b'-') {
                acc = acc.sub(self.term()?)?;
            } else {
                break;
            }
        }
        self.depth -= 1;
        Some(acc)
    }

    fn starts_primary(&self) -> bool {
        match self.peek() {
            Some(c) if c.is_ascii_digit() || matches!(c, b'(' | b'{' | b'.') => true,
            Some(b'\\') => ["frac", "sqrt", "pi"].iter().any(|name| {
                let end = self.pos + 1 + name.len();
                self.s.get(self.pos + 1..end) == Some(name.as_bytes())
                    && !self.s.get(end).is_some_and(|c| c.is_ascii_alphabetic())
            }),
            _ => false,
        }
    }

    fn term(&mut self) -> Option<Value> {
        let mut acc = self.unary()?;
        loop {
            if self.eat(b'*') || self.eat_command("cdot") || self.eat_command("times") {
                acc = acc.mul(self.unary()?)?;
            } else if self.eat(b'/') || self.eat_command("div") {
                acc = acc.div(self.unary()?)?;
            } else if self.starts_primary() {
                // Implicit multiplication: 2\sqrt{3}, 3\pi, (1+2)(3).
                acc = acc.mul(self.power()?)?;
            } else {
                return Some(acc);
            }
        }
    }

    fn unary(&mut self) -> Option<Value> {
        self.enter()?;
        let v = if self.eat(b'-') {
            self.unary()?.neg()
        } else if self.eat(b'+') {
            self.unary()?
        } else {
            self.power()?
        };
        self.depth -= 1;
        Some(v)
    }

    fn power(&mut self) -> Option<Value> {
        let base = self.primary()?;
        if !self.eat(b'^') {
            return Some(base);
        }
        // LaTeX takes one character as the exponent unless braced: 2^23 is 2^2 * 3.
        let exponent = match self.peek() {
            Some(c) if c.is_ascii_digit() => {
                self.pos += 1;
                Value::Exact(Ratio::int(i128::from(c - b'0')))
            }
            _ => self.unary()?,
        };
        base.pow(exponent)
    }

    /// A `\frac`/`\sqrt` argument: `{expr}` or a single character/command (`\frac12`).
    fn argument(&mut self) -> Option<Value> {
        match self.peek() {
            Some(b'{') => self.primary(),
            Some(c) if c.is_ascii_digit() => {
                self.pos += 1;
                Some(Value::Exact(Ratio::int(i128::from(c - b'0'))))
            }
            _ => self.primary(),
        }
    }

    fn primary(&mut self) -> Option<Value> {
        self.enter()?;
        let v = match self.peek()? {
            b'(' => {
                self.pos += 1;
                let v = self.expr()?;
                self.eat(b')').then_some(v)?
            }
            b'{' => {
                self.pos += 1;
                let v = self.expr()?;
                self.eat(b'}').then_some(v)?
            }
            c if c.is_ascii_digit() || c == b'.' => self.number_with_mixed_fraction()?,
            b'\\' if self.eat_command("frac") => {
                let num = self.argument()?;
                let den = self.argument()?;
                num.div(den)?
            }
            b'\\' if self.eat_command("sqrt") => {
                let n = if self.eat(b'[') {
                    let start = self.pos;
                    while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        self.pos += 1;
                    }
                    let n: u32 = std::str::from_utf8(self.s.get(start..self.pos)?)
                        .ok()?
                        .parse()
                        .ok()?;
                    self.eat(b']').then_some(())?;
                    (2..=64).contains(&n).then_some(n)?
                } else {
                    2
                };
                self.argument()?.root(n)?
            }
            b'\\' if self.eat_command("pi") => Value::Approx(PI),
            _ => return None,
        };
        self.depth -= 1;
        Some(v)
    }

    /// A decimal literal; an integer followed by a digit-only `\frac` is a mixed number.
    fn number_with_mixed_fraction(&mut self) -> Option<Value> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit() || c == b'.') {
            self.pos += 1;
        }
        let literal = std::str::from_utf8(self.s.get(start..self.pos)?).ok()?;
        let whole = parse_decimal(literal)?;
        if literal.contains('.') {
            return Some(whole);
        }
        let save = self.pos;
        if let Some(frac) = self.digit_only_frac() {
            return whole.add(frac);
        }
        self.pos = save;
        Some(whole)
    }

    fn digit_only_frac(&mut self) -> Option<Value> {
        if !self.eat_command("frac") {
            return None;
        }
        let num = self.digit_group()?;
        let den = self.digit_group()?;
        Value::Exact(Ratio::int(num)).div(Value::Exact(Ratio::int(den)))
    }

    /// `{123}` or a single digit.
    fn digit_group(&mut self) -> Option<i128> {
        let braced = self.eat(b'{');
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) && (braced || self.pos == start) {
            self.pos += 1;
        }
        let digits = std::str::from_utf8(self.s.get(start..self.pos)?).ok()?;
        if digits.is_empty() || digits.len() > MAX_EXACT_DIGITS || (braced && !self.eat(b'}')) {
            return None;
        }
        digits.parse().ok()
    }
}

/// Parses `123`, `1.5`, `.5`, `5.` exactly when it has at most [`MAX_EXACT_DIGITS`] digits.
fn parse_decimal(literal: &str) -> Option<Value> {
    let (int_part, frac_part) = literal.split_once('.').unwrap_or((literal, ""));
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return None;
    }
    let frac_part = frac_part.trim_end_matches('0');
    let digits = format!("{}{}", int_part.trim_start_matches('0'), frac_part);
    if digits.len() <= MAX_EXACT_DIGITS && frac_part.len() <= MAX_EXACT_DIGITS {
        let num: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        let den = 10i128.checked_pow(u32::try_from(frac_part.len()).ok()?)?;
        return Ratio::new(num, den).map(Value::Exact);
    }
    let x: f64 = literal.trim_end_matches('.').parse().ok()?;
    finite(x)
}

#[cfg(test)]
mod tests {
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
            "$\\frac{2}{3}$"
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
        assert_eq!(ok.reason, "correct: 0.3333333 == 1/3");
        assert_eq!(ok.extracted.as_deref(), Some("0.3333333"));
        let bad = v().verify("#### 12", "13");
        assert_eq!(bad.score, 0.0);
        assert_eq!(bad.reason, "mismatch: extracted 12 vs reference 13");
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
        assert!(evaluate(&"9".repeat(300)).is_none()); // longer than MAX_EXPR_BYTES
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
}

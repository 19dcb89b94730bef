//! Extraction: where in a response the final answer is.
//!
//! Reasoning inside `<think>...</think>` is dropped first (an unclosed `<think>` drops the rest
//! of the response): a thought is never the answer. Then, in priority order, the first rule
//! that yields a non-empty answer wins:
//! 1. the text after the last `####` (GSM8K style) up to the end of its line; a `####` followed
//!    by a word is a markdown heading (`#### Step 1`) and is skipped;
//! 2. the content of the LAST `\boxed{...}` / `\fbox{...}` (nested braces; `\boxed 5` too);
//!    boxes written side by side at the end (`\boxed{2}, \boxed{3}`) are joined into a list;
//! 3. the last answer marker: `Final Answer: ...`, `The (final) answer is ...`,
//!    `**Answer:** ...`, up to the end of the sentence; a `$...$` inside it is taken alone;
//! 4. the last math block `$...$`, `$$...$$`, `\(...\)`, `\[...\]` (of a chain `a = b = c`, the
//!    last side);
//! 5. the last number in the response.
//!
//! Rules 4 and 5 find unmarked answers; `last_number_fallback = false` switches both off.

/// How many `\boxed` occurrences (from the last backwards) are tried before giving up.
const MAX_BOXED_TRIES: usize = 8;
/// How many `####` occurrences (from the last backwards) are tried before giving up.
const MAX_HASH_TRIES: usize = 8;
/// How many `answer` occurrences (from the last backwards) are tried before giving up.
const MAX_ANSWER_LINE_TRIES: usize = 16;
/// Longest run of number characters the last-number fallback accepts.
const MAX_NUMBER_CHARS: usize = 100;

use super::normalize::strip_thousands_separators;
use super::MAX_ANSWER_BYTES;

/// Where in the response an answer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerSource {
    /// After `####`.
    Hashes,
    /// Inside the last `\boxed{}` or `\fbox{}` (several adjacent boxes: joined).
    Boxed,
    /// After an answer marker (`Final Answer:`, `The answer is`).
    AnswerLine,
    /// The last `$...$` / `\[...\]` block.
    MathBlock,
    /// The last number in the response.
    LastNumber,
}

impl AnswerSource {
    /// A short name for audits.
    pub fn name(self) -> &'static str {
        match self {
            AnswerSource::Hashes => "hashes",
            AnswerSource::Boxed => "boxed",
            AnswerSource::AnswerLine => "answer-marker",
            AnswerSource::MathBlock => "last-math-block",
            AnswerSource::LastNumber => "last-number",
        }
    }
}

/// Finds the answer in `window` (the tail of a response), trying the rules in priority order.
pub fn extract_answer(window: &str, unmarked_fallbacks: bool) -> Option<(String, AnswerSource)> {
    let w = strip_reasoning(window);
    if let Some(a) = extract_after_hashes(w) {
        return Some((a.to_string(), AnswerSource::Hashes));
    }
    if let Some(a) = extract_boxed_group(w) {
        return Some((a, AnswerSource::Boxed));
    }
    if let Some(a) = extract_answer_line(w) {
        return Some((a, AnswerSource::AnswerLine));
    }
    if !unmarked_fallbacks {
        return None;
    }
    if let Some(a) = extract_last_math_block(w) {
        return Some((a, AnswerSource::MathBlock));
    }
    extract_last_number(w).map(|a| (a.to_string(), AnswerSource::LastNumber))
}

/// The response without its reasoning: after the last `</think>`; before an unclosed `<think>`.
fn strip_reasoning(w: &str) -> &str {
    if let Some(end) = w.rfind("</think>") {
        return w.get(end + "</think>".len()..).unwrap_or("");
    }
    match w.find("<think>") {
        Some(start) => w.get(..start).unwrap_or(""),
        None => w,
    }
}

/// The last `max_bytes` of `s`, moved forward to a char boundary. Answers sit at the end.
pub fn tail_window(s: &str, max_bytes: usize) -> &str {
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
pub fn matching_brace(b: &[u8], open: usize) -> Option<usize> {
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

/// The last boxed answer; boxes written side by side just before it (`\boxed{2}, \boxed{3}`,
/// `\boxed{2} and \boxed{3}`) are joined into one list `2, 3`. `or` does not join: it usually
/// offers one answer in two forms (`\boxed{15\frac{39}{40}}` or `\boxed{\frac{639}{40}}`).
fn extract_boxed_group(w: &str) -> Option<String> {
    let (mut start, last) = extract_last_boxed(w, w.len())?;
    let mut group = vec![last];
    for _ in 0..MAX_BOXED_TRIES {
        let Some((prev_start, prev)) = extract_last_boxed(w, start) else {
            break;
        };
        let between = w.get(prev_start..start).unwrap_or("");
        let Some(close) = between.rfind('}') else {
            break;
        };
        let gap = between.get(close + 1..).unwrap_or("");
        let separator_only = gap
            .replace("\\text", "")
            .replace("\\quad", "")
            .replace("also", "")
            .replace("and", "")
            .chars()
            .all(|c| matches!(c, ' ' | ',' | '$' | ';' | '{' | '}' | '\\'));
        if !separator_only || gap.contains('\n') {
            break;
        }
        group.push(prev);
        start = prev_start;
    }
    group.reverse();
    Some(group.join(", "))
}

/// (start of the command, content) of the last well-formed non-empty box before `end`.
fn extract_last_boxed(w: &str, end: usize) -> Option<(usize, &str)> {
    let mut end = end;
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
            return Some((pos, content));
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

/// Answer markers, lower case, tried at every case-insensitive occurrence of `answer`.
fn extract_answer_line(w: &str) -> Option<String> {
    let b = w.as_bytes();
    let mut end = b.len();
    for _ in 0..MAX_ANSWER_LINE_TRIES {
        let pos = rfind_ascii_ci(b, b"answer", end)?;
        end = pos;
        let mut i = pos + "answer".len();
        while b
            .get(i)
            .is_some_and(|c| matches!(c, b'*' | b' ' | b'\t' | b'}' | b'#'))
        {
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
            // `**Final Answer**` on its own line: the answer is on the next non-empty line.
            Some(b'\n')
                if b.get(pos.saturating_sub(6)..pos)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"final ")) =>
            {
                i
            }
            _ => continue,
        };
        let rest = w
            .get(after_marker..)?
            .trim_start_matches([':', '*', ' ', '\t']);
        let rest = rest.trim_start_matches(['\n', ' ', '\t']);
        let line = rest.split('\n').next().unwrap_or("");
        if let Some(math) = joined_math_blocks(line).or_else(|| extract_last_math_block(line)) {
            return Some(math);
        }
        // A sentence ends at ". " (a decimal point is followed by a digit, not a space).
        let sentence = line.split(". ").next().unwrap_or(line);
        let sentence = cut_at_comma_clause(sentence);
        let cleaned = sentence.trim().trim_matches('*').trim_start_matches(':');
        if let Some(answer) = clean_candidate(cleaned) {
            return Some(answer.to_string());
        }
    }
    None
}

/// The content of the last `$...$`, `$$...$$`, `\(...\)` or `\[...\]` block; of an equation
/// chain `a = b = c` (or `2 + 3 = 5`) the last side, of `x = 5` all of it.
fn extract_last_math_block(w: &str) -> Option<String> {
    let content = last_delimited(w, "\\[", "\\]")
        .into_iter()
        .chain(last_delimited(w, "\\(", "\\)"))
        .chain(last_dollar_block(w))
        .max_by_key(|(end, _)| *end)
        .map(|(_, c)| c)?;
    let content = clean_candidate(content)?;
    let sides: Vec<&str> = content.split('=').collect();
    let lone_variable = |s: &str| {
        let t = s.trim();
        t.len() == 1 && t.bytes().all(|c| c.is_ascii_alphabetic())
    };
    let answer = match sides.as_slice() {
        [_] => content,
        [lhs, _] if lone_variable(lhs) => content,
        [.., last] => last.trim(),
        [] => return None,
    };
    clean_candidate(answer).map(str::to_string)
}

/// (end position, content) of the last `open ... close` block.
fn last_delimited<'a>(w: &'a str, open: &str, close: &str) -> Option<(usize, &'a str)> {
    let end = w.rfind(close)?;
    let start = w.get(..end)?.rfind(open)? + open.len();
    Some((end, w.get(start..end)?))
}

/// `5, not 6` → `5`; `5, since ...` → `5`: a comma followed by a word other than `and`/`or`
/// starts a new clause. Lists (`3, 5, and 7`) are kept.
fn cut_at_comma_clause(s: &str) -> &str {
    let mut from = 0;
    while let Some(i) = s.get(from..).and_then(|r| r.find(", ")) {
        let at = from + i;
        let word: String = s
            .get(at + 2..)
            .unwrap_or("")
            .chars()
            .take_while(char::is_ascii_alphabetic)
            .collect();
        if word.len() >= 2 && word != "and" && word != "or" {
            return s.get(..at).unwrap_or(s);
        }
        from = at + 2;
    }
    s
}

/// `$x = 4$ or $x = -4$` on an answer line: blocks joined only by `,`, `or`, `and` are one
/// list of solutions, `x = 4, x = -4`.
fn joined_math_blocks(line: &str) -> Option<String> {
    let blocks = dollar_blocks(line)?;
    if blocks.len() < 2 {
        return None;
    }
    let mut parts = Vec::new();
    let mut prev_end = None;
    for (start, end, content) in blocks {
        if let Some(p) = prev_end {
            let gap = line.get(p + 1..start)?;
            let separators_only = gap
                .replace("and", "")
                .replace("or", "")
                .chars()
                .all(|c| c == ',' || c.is_whitespace());
            if !separators_only {
                return None;
            }
        }
        parts.push(content.trim());
        prev_end = Some(end);
    }
    Some(parts.join(", "))
}

/// (end position, content) of the last `$...$` or `$$...$$` block; `\$` is a dollar sign.
fn last_dollar_block(w: &str) -> Option<(usize, &str)> {
    dollar_blocks(w)?
        .into_iter()
        .next_back()
        .map(|(_, end, c)| (end, c))
}

/// (opening `$`, closing `$`, content) of every math `$...$` / `$$...$$` block, in order;
/// prose between two price dollar signs is skipped.
fn dollar_blocks(w: &str) -> Option<Vec<(usize, usize, &str)>> {
    let b = w.as_bytes();
    let dollars: Vec<usize> = (0..b.len())
        .filter(|&i| b.get(i) == Some(&b'$') && (i == 0 || b.get(i - 1) != Some(&b'\\')))
        .collect();
    let mut blocks = Vec::new();
    let mut k = 0;
    while k + 1 < dollars.len() {
        let (open, next) = (dollars.get(k).copied()?, dollars.get(k + 1).copied()?);
        if next == open + 1 {
            // `$$...$$`: the content runs to the next `$$`.
            let close = dollars.get(k + 2).copied()?;
            blocks.push((open, close + 1, w.get(open + 2..close)?));
            k += 4;
        } else {
            blocks.push((open, next, w.get(open + 1..next)?));
            k += 2;
        }
    }
    blocks.retain(|(_, _, c)| !c.trim().is_empty() && !looks_like_prose(c));
    Some(blocks)
}

/// `$5 and the other $`: two dollar signs around prose are prices, not math. Prose has a run
/// of three or more letters that is not a command name (`\frac`) or inside `\text{}`.
fn looks_like_prose(c: &str) -> bool {
    let b = c.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_alphabetic) {
            i += 1;
        }
        if i - start >= 3
            && start > 0
            && b.get(start - 1) != Some(&b'\\')
            && b.get(start - 1) != Some(&b'{')
        {
            return true;
        }
        if i - start >= 3 && start == 0 {
            return true;
        }
        i = i.max(start + 1);
    }
    false
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

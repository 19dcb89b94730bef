//! Normalisation: LaTeX and prose noise removed so that equal answers read alike before parsing.
//!
//! Drops `$`, `\left`/`\right`, spacing commands (`\!`, `\,`, `~`), degrees, `\%`, trailing
//! units (`\text{ cm}^2`, `5 apples`), `\text{}` wrappers, whitespace, thousands separators,
//! trailing periods and trailing decimal zeros; `\dfrac`/`\tfrac`/`\cfrac` become `\frac`.

use super::extract::matching_brace;
use super::MAX_ANSWER_BYTES;

/// Most `\text{...}`-like commands unwrapped in one answer.
const MAX_TEXT_COMMANDS: usize = 32;

/// Longest answer that is normalised; longer input is only trimmed (keeps the work bounded).
const MAX_NORMALIZE_BYTES: usize = 4 * MAX_ANSWER_BYTES;

/// Normalises an answer string so that equal answers compare equal as strings as often as
/// possible: drops `$`, `\left`/`\right`, spacing commands, degrees, percent, trailing units
/// (`\text{ cm}^2`, `5 apples`), `\text{}` wrappers, whitespace, `x =` prefixes, thousands
/// separators, trailing periods and trailing decimal zeros; `\dfrac`/`\tfrac` become `\frac`.
pub fn normalize_answer(raw: &str) -> String {
    let s = normalize_keep_relations(raw);
    let s = strip_variable_prefix(&s);
    let s = strip_thousands_separators(s).unwrap_or_else(|| s.to_string());
    strip_trailing_decimal_zeros(&s)
}

/// [`normalize_answer`] without dropping an `x =` prefix, so that the parser still sees
/// relations (`x \geq 5`, `y = 2x + 3`) and decides what they mean.
pub fn normalize_keep_relations(raw: &str) -> String {
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
    s = words_as_list_separators(&s);
    for (cmd, to) in COMMAND_REWRITES {
        s = replace_command(&s, cmd, to);
    }
    s = unwrap_text_commands(&s);
    s = strip_trailing_unit_words(&s);
    s = remove_whitespace(&s);
    s = simplify_single_char_scripts(&s);
    s = decimal_commas(&s);
    let s = s.trim_end_matches('.');
    let s = strip_thousands_separators(s).unwrap_or_else(|| s.to_string());
    strip_trailing_decimal_zeros(&s)
}

/// `3{,}5` → `3.5`: a braced comma followed by other than exactly three digits is a decimal
/// comma; `1{,}000` (three digits) stays a thousands separator (`{,}` → `,`).
fn decimal_commas(s: &str) -> String {
    if !s.contains("{,}") {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("{,}") {
        out.push_str(rest.get(..i).unwrap_or(""));
        let after = rest.get(i + 3..).unwrap_or("");
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let before_digit = out.as_bytes().last().is_some_and(u8::is_ascii_digit);
        out.push(if before_digit && digits > 0 && digits != 3 {
            '.'
        } else {
            ','
        });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `1 \text{ or } 2`, `x=1 or x=2`, `2 and 3` → comma lists: the words join solutions.
fn words_as_list_separators(s: &str) -> String {
    let mut s = s.to_string();
    for word in [
        "\\text{ or }",
        "\\text{or}",
        "\\text{ and }",
        "\\text{and}",
        " or ",
        " and ",
    ] {
        if s.contains(word) {
            s = s.replace(word, ",");
        }
    }
    s
}

/// Drops whitespace, except one space between a command name and a following letter
/// (`\pi r^2` must not become the unknown command `\pir`).
fn remove_whitespace(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_command = false;
    let mut pending_space = false;
    for c in s.chars() {
        if c.is_whitespace() {
            pending_space = in_command;
            continue;
        }
        if pending_space && c.is_ascii_alphabetic() {
            out.push(' ');
        }
        pending_space = false;
        in_command = if c == '\\' {
            true
        } else {
            in_command && c.is_ascii_alphabetic()
        };
        out.push(c);
    }
    out
}

/// Whether an answer is written as a percentage (`50\%`, `50%`, `50 percent`).
pub fn has_percent(raw: &str) -> bool {
    raw.contains('%') || raw.contains("percent")
}

/// Literal substitutions applied first, in this order (`\$` before `$`, `\%` before `%`).
const PLAIN_REWRITES: [(&str, &str); 9] = [
    ("\\mathbb{R}", "(-\\infty,\\infty)"),
    ("\\mathbb R", "(-\\infty,\\infty)"),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
    ("$", ""),
    ("\\%", ""),
    ("%", ""),
    ("~", " "),
];

/// LaTeX commands rewritten when not followed by a letter (so `\left` leaves `\leftarrow`).
const COMMAND_REWRITES: [(&str, &str); 20] = [
    ("\\bigl", ""),
    ("\\bigr", ""),
    ("\\Bigl", ""),
    ("\\Bigr", ""),
    ("\\big", ""),
    ("\\Big", ""),
    ("\\limits", ""),
    ("\\mathstrut", ""),
    ("\\mathop", ""),
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

const TEXT_COMMANDS: [&str; 14] = [
    "textsf",
    "texttt",
    "mathsf",
    "boldsymbol",
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
            .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'.' | b',' | b'/'));
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
pub fn strip_thousands_separators(s: &str) -> Option<String> {
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

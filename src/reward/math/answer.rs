//! The structure of an answer: a number or expression, a tuple or interval, a set or list of
//! solutions, a union of intervals, a relation (equation or inequality), a matrix, a
//! multiple-choice letter, or text. Built from a normalised answer string.

use super::expr::{parse_expr, Expr};

/// Most elements in one tuple, interval, set, list or matrix.
pub const MAX_LIST_ELEMENTS: usize = 64;
/// Deepest nesting of lists (tuples of tuples, ...).
const MAX_LIST_DEPTH: usize = 4;
/// Most list elements, over all nesting levels, parsed from one answer.
pub const MAX_TOTAL_ELEMENTS: usize = 128;

/// A relation operator, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl RelOp {
    pub fn symbol(self) -> &'static str {
        match self {
            RelOp::Eq => "=",
            RelOp::Ne => "!=",
            RelOp::Lt => "<",
            RelOp::Le => "<=",
            RelOp::Gt => ">",
            RelOp::Ge => ">=",
        }
    }
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Expr(Expr),
    /// `(a, b)`, `[a, b)`, ...: a tuple or an interval (the brackets are kept).
    Bracketed(u8, u8, Vec<Answer>),
    /// `\{a, b\}` (order ignored); `\emptyset` is the empty set.
    Set(Vec<Answer>),
    /// `a, b` or `a \text{ or } b`: all solutions (order ignored).
    List(Vec<Answer>),
    /// `A \cup B` (order ignored).
    Union(Vec<Answer>),
    Matrix(Vec<Vec<Answer>>),
    /// `a < x \le b`, `y = 2x + 3`: sides and the operators between them.
    Relation(Vec<Expr>, Vec<RelOp>),
    /// A multiple-choice letter: `(C)`, `C`, `\text{(C)}`.
    Choice(char),
    /// Anything else, compared as lower-case text.
    Text(String),
}

impl Answer {
    /// A short description for audits.
    pub fn describe(&self) -> String {
        let list = |items: &[Answer]| {
            items
                .iter()
                .map(Answer::describe)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Answer::Expr(e) => {
                let shown = super::show::show(e);
                match super::show::value_of(e) {
                    Some(v) if v != shown => format!("expr {shown} = {v}"),
                    _ => format!("expr {shown}"),
                }
            }
            Answer::Bracketed(o, c, items) => {
                let kind = if items.len() == 2 {
                    "interval/tuple"
                } else {
                    "tuple"
                };
                format!("{kind} {}{}{}", char::from(*o), list(items), char::from(*c))
            }
            Answer::Set(items) => format!("set {{{}}}", list(items)),
            Answer::List(items) => format!("list [{}]", list(items)),
            Answer::Union(items) => format!("union of {}", list(items)),
            Answer::Matrix(rows) => {
                format!("matrix {}x{}", rows.len(), rows.first().map_or(0, Vec::len))
            }
            Answer::Relation(sides, ops) => {
                let mut s = String::from("relation ");
                for (i, side) in sides.iter().enumerate() {
                    if i > 0 {
                        let op = ops.get(i - 1).map_or("?", |o| o.symbol());
                        s.push_str(&format!(" {op} "));
                    }
                    s.push_str(&super::show::show(side));
                }
                s
            }
            Answer::Choice(c) => format!("choice ({c})"),
            Answer::Text(t) => format!("text {t:?}"),
        }
    }
}

/// Parses a normalised answer (see [`super::normalize::normalize_keep_relations`]).
pub fn parse_answer(s: &str) -> Answer {
    let mut budget = MAX_TOTAL_ELEMENTS;
    parse_at(s, 0, &mut budget)
}

fn parse_at(s: &str, depth: usize, budget: &mut usize) -> Answer {
    let s = s.trim().trim_end_matches('.');
    if let Some(c) = choice_letter(s) {
        return Answer::Choice(c);
    }
    if matches!(s, "\\emptyset" | "\\varnothing" | "\\{\\}" | "{}") {
        return Answer::Set(Vec::new());
    }
    if depth < MAX_LIST_DEPTH {
        if let Some(a) = parse_structure(s, depth, budget) {
            return a;
        }
    }
    if let Some(a) = parse_relation(s) {
        return a;
    }
    match parse_expr(s) {
        Some(e) => Answer::Expr(e),
        None => Answer::Text(text_form(s)),
    }
}

/// Text answers compare without case, braces or backslashes (`\text{East}` = `east`).
fn text_form(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '{' | '}' | '\\' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// `(C)`, `C`, `C)`, `\textbf{C}` (already unwrapped): a single capital letter A-E.
fn choice_letter(s: &str) -> Option<char> {
    let t = s
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim_end_matches(':');
    let mut chars = t.chars();
    let c = chars.next()?;
    (chars.next().is_none() && ('A'..='E').contains(&c)).then_some(c)
}

/// Takes `n` from the element budget; false (and nothing taken) when it would run out.
fn take_budget(budget: &mut usize, n: usize) -> bool {
    if n > *budget || n > MAX_LIST_ELEMENTS {
        return false;
    }
    *budget -= n;
    true
}

fn parse_items(parts: &[&str], depth: usize, budget: &mut usize) -> Option<Vec<Answer>> {
    if !take_budget(budget, parts.len()) {
        return None;
    }
    Some(
        parts
            .iter()
            .map(|p| parse_at(p, depth + 1, budget))
            .collect(),
    )
}

/// Unions, `x \in S`, matrices, sets, bracketed tuples/intervals and bare lists.
fn parse_structure(s: &str, depth: usize, budget: &mut usize) -> Option<Answer> {
    let unions = split_top_level(s, &["\\cup"])?;
    if unions.len() >= 2 {
        return parse_items(&unions, depth, budget).map(Answer::Union);
    }
    if let Some((lhs, rhs)) = s.split_once("\\in") {
        let is_variable = lhs.len() == 1 && lhs.bytes().all(|c| c.is_ascii_alphabetic());
        if is_variable && !rhs.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Some(parse_at(rhs, depth + 1, budget));
        }
    }
    for env in ["pmatrix", "bmatrix", "matrix", "vmatrix"] {
        let begin = format!("\\begin{{{env}}}");
        let end = format!("\\end{{{env}}}");
        if let Some(inner) = s.strip_prefix(&begin).and_then(|r| r.strip_suffix(&end)) {
            let mut rows = Vec::new();
            for row in split_top_level(inner, &["\\\\"])? {
                if row.is_empty() {
                    continue;
                }
                let cells = split_top_level(row, &["&"])?;
                rows.push(parse_items(&cells, depth, budget)?);
            }
            return Some(Answer::Matrix(rows));
        }
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        if encloses_all(s, "\\{", "\\}") {
            let parts = split_top_level(inner, &[","])?;
            return parse_items(&parts, depth, budget).map(Answer::Set);
        }
    }
    let b = s.as_bytes();
    let (first, last) = (*b.first()?, *b.last()?);
    if matches!(first, b'(' | b'[') && matches!(last, b')' | b']') && brackets_enclose_all(s) {
        let inner = s.get(1..s.len() - 1)?;
        let parts = split_top_level(inner, &[","])?;
        // `(5)` is a parenthesised number, not a 1-tuple.
        if parts.len() >= 2 {
            return parse_items(&parts, depth, budget).map(|v| Answer::Bracketed(first, last, v));
        }
    }
    let parts = split_top_level(s, &[",", ";"])?;
    if parts.len() >= 2 {
        return parse_items(&parts, depth, budget).map(Answer::List);
    }
    None
}

/// Relation operators, longest first so that `\leq` is not read as `\le` + `q`.
const RELATIONS: [(&str, RelOp); 16] = [
    ("\\leqslant", RelOp::Le),
    ("\\geqslant", RelOp::Ge),
    ("\\leq", RelOp::Le),
    ("\\geq", RelOp::Ge),
    ("\\neq", RelOp::Ne),
    ("\\le", RelOp::Le),
    ("\\ge", RelOp::Ge),
    ("\\ne", RelOp::Ne),
    ("\\lt", RelOp::Lt),
    ("\\gt", RelOp::Gt),
    ("<=", RelOp::Le),
    (">=", RelOp::Ge),
    ("!=", RelOp::Ne),
    ("=", RelOp::Eq),
    ("<", RelOp::Lt),
    (">", RelOp::Gt),
];

/// `a op b op c ...` at the top level; None when there is no relation or a side is not an
/// expression.
fn parse_relation(s: &str) -> Option<Answer> {
    let b = s.as_bytes();
    let (mut sides, mut ops) = (Vec::new(), Vec::new());
    let (mut depth, mut start, mut i) = (0i64, 0usize, 0usize);
    while i < b.len() {
        let c = b.get(i).copied().unwrap_or(0);
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            let hit = RELATIONS.iter().find(|(sym, _)| {
                b.get(i..i + sym.len()) == Some(sym.as_bytes())
                    && (!sym.starts_with('\\')
                        || !b.get(i + sym.len()).is_some_and(u8::is_ascii_alphabetic))
            });
            if let Some((sym, op)) = hit {
                sides.push(s.get(start..i)?);
                ops.push(*op);
                i += sym.len();
                start = i;
                continue;
            }
        }
        // Skip a whole command name so `\left` or `\in` never split mid-word.
        if c == b'\\' {
            i += 1;
            while b.get(i).is_some_and(u8::is_ascii_alphabetic) {
                i += 1;
            }
            if i == start + 1 {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    if ops.is_empty() {
        return None;
    }
    sides.push(s.get(start..)?);
    let exprs: Option<Vec<Expr>> = sides
        .iter()
        .map(|side| function_name(side).or_else(|| parse_expr(side)))
        .collect();
    Some(Answer::Relation(exprs?, ops))
}

/// `f(x)` on one side of an equation names the function being defined: read as one variable
/// so that `f(x) = x^2` reduces to `x^2` like `y = x^2` does.
fn function_name(side: &str) -> Option<Expr> {
    let b = side.as_bytes();
    let is_name = b.len() == 4
        && b.first().is_some_and(u8::is_ascii_alphabetic)
        && b.get(1) == Some(&b'(')
        && b.get(2).is_some_and(u8::is_ascii_alphabetic)
        && b.get(3) == Some(&b')');
    is_name.then(|| Expr::Var(side.to_string()))
}

/// Splits `s` at top-level occurrences of the separators (outside (), [], {}, \{ \}).
pub fn split_top_level<'a>(s: &'a str, separators: &[&str]) -> Option<Vec<&'a str>> {
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
                match b.get(i + 1) {
                    Some(b'{') => depth += 1,
                    Some(b'}') => depth -= 1,
                    _ => {}
                }
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
fn brackets_enclose_all(s: &str) -> bool {
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

/// True when the `open` at the start of `s` is closed by the `close` at its end.
fn encloses_all(s: &str, open: &str, close: &str) -> bool {
    let mut depth = 0i64;
    let mut i = 0;
    while i < s.len() {
        let rest = s.get(i..).unwrap_or("");
        if rest.starts_with(open) {
            depth += 1;
            i += open.len();
            continue;
        }
        if rest.starts_with(close) {
            depth -= 1;
            i += close.len();
            if depth == 0 && i != s.len() {
                return false;
            }
            continue;
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    depth == 0
}

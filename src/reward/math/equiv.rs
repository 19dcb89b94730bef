//! Equivalence of two parsed answers, and the rule that decided it.
//!
//! Numbers (no free variables) are compared exactly as rationals first; an irrational value
//! or a non-terminating fraction against a decimal is compared with relative tolerance
//! `rel_tol`. Expressions with free variables are evaluated at [`POINTS`] deterministic
//! pseudo-random points and must agree at every point where both are defined (at least
//! [`MIN_VALID_POINTS`] of them). Structures compare by kind: tuples and intervals element by
//! element with the same brackets, sets/lists/unions as multisets, matrices entry by entry,
//! relations as relations (see [`reduce`] for how relations become values or intervals).

use super::answer::{Answer, RelOp};
use super::eval::{eval_f64, eval_value, Budget};
use super::expr::{Constant, Expr};
use super::numeric::{values_equal, Ratio, Value};

/// Points tried when comparing expressions with free variables.
pub const POINTS: usize = 12;
/// Points where both sides must be defined for a random-point verdict.
pub const MIN_VALID_POINTS: usize = 4;
/// Relative tolerance at random points (floating-point evaluation noise only).
const POINT_TOL: f64 = 1e-8;
/// Most readings of a `\pm` answer (three `\pm` signs).
const MAX_PM_READINGS: usize = 8;

/// What decided a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    pub equal: bool,
    /// The rule's name, listed in docs/verifier.md.
    pub rule: &'static str,
}

fn judged(equal: bool, rule: &'static str) -> Judgement {
    Judgement { equal, rule }
}

/// The comparison settings and its time budget.
pub struct Ctx {
    pub rel_tol: f64,
    pub budget: Budget,
}

/// Rewrites an answer into the form it is compared in:
/// - `x = 5`, `y = 2x + 3` (a lone variable on one side, absent from the other) → the other
///   side; an equation between two expressions stays a relation;
/// - `x \ge 5` → `[5, \infty)`, `x < 3` → `(-\infty, 3)`, `-2 < x \le 3` → `(-2, 3]`,
///   `x \ne 3` → `(-\infty, 3) \cup (3, \infty)`;
/// - `1 \pm \sqrt2` → the list `1 + \sqrt2, 1 - \sqrt2`;
/// - a union of one interval → that interval; elements of lists and sets are reduced too.
pub fn reduce(a: Answer) -> Answer {
    match a {
        Answer::Relation(sides, ops) => match reduce_relation(sides, ops) {
            e @ Answer::Expr(_) => reduce(e),
            other => other,
        },
        Answer::Expr(e) if e.has_plus_minus() => {
            let readings = plus_minus_readings(e);
            if readings.len() == 1 {
                readings
                    .into_iter()
                    .next()
                    .map_or(Answer::Text(String::new()), Answer::Expr)
            } else {
                Answer::List(readings.into_iter().map(Answer::Expr).collect())
            }
        }
        Answer::List(items) => Answer::List(flatten_lists(items)),
        Answer::Set(items) => Answer::Set(flatten_lists(items)),
        Answer::Bracketed(o, c, items) => {
            Answer::Bracketed(o, c, items.into_iter().map(reduce).collect())
        }
        Answer::Union(items) if items.len() == 1 => reduce(
            items
                .into_iter()
                .next()
                .unwrap_or(Answer::Text(String::new())),
        ),
        Answer::Union(items) => Answer::Union(items.into_iter().map(reduce).collect()),
        other => other,
    }
}

/// Reduced elements; an element that reduces to a list (`x = \pm 2`) adds its members.
fn flatten_lists(items: Vec<Answer>) -> Vec<Answer> {
    let mut out = Vec::new();
    for item in items {
        match reduce(item) {
            Answer::List(inner) => out.extend(inner),
            other => out.push(other),
        }
    }
    out
}

fn plus_minus_readings(e: Expr) -> Vec<Expr> {
    let mut done = Vec::new();
    let mut todo = vec![e];
    while let Some(e) = todo.pop() {
        match e.split_plus_minus() {
            Some((p, m)) if done.len() + todo.len() + 2 <= MAX_PM_READINGS => {
                todo.push(m);
                todo.push(p);
            }
            _ => done.push(e),
        }
    }
    done
}

fn lone_variable(e: &Expr) -> Option<&str> {
    match e {
        Expr::Var(v) => Some(v),
        _ => None,
    }
}

fn infinity(sign: i8) -> Answer {
    let inf = Expr::Const(Constant::Infinity);
    Answer::Expr(if sign > 0 {
        inf
    } else {
        Expr::Neg(Box::new(inf))
    })
}

fn flip(op: RelOp) -> RelOp {
    match op {
        RelOp::Lt => RelOp::Gt,
        RelOp::Le => RelOp::Ge,
        RelOp::Gt => RelOp::Lt,
        RelOp::Ge => RelOp::Le,
        other => other,
    }
}

/// `var op bound` as an interval (or a union for `!=`).
fn ray(op: RelOp, bound: Expr) -> Answer {
    let b = Answer::Expr(bound);
    match op {
        RelOp::Gt => Answer::Bracketed(b'(', b')', vec![b, infinity(1)]),
        RelOp::Ge => Answer::Bracketed(b'[', b')', vec![b, infinity(1)]),
        RelOp::Lt => Answer::Bracketed(b'(', b')', vec![infinity(-1), b]),
        RelOp::Le => Answer::Bracketed(b'(', b']', vec![infinity(-1), b]),
        RelOp::Ne => Answer::Union(vec![
            Answer::Bracketed(b'(', b')', vec![infinity(-1), b.clone()]),
            Answer::Bracketed(b'(', b')', vec![b, infinity(1)]),
        ]),
        RelOp::Eq => b,
    }
}

fn reduce_relation(sides: Vec<Expr>, ops: Vec<RelOp>) -> Answer {
    match (sides.as_slice(), ops.as_slice()) {
        ([l, r], [op]) => {
            if let Some(v) = lone_variable(l) {
                if !r.variables().iter().any(|x| x == v) {
                    return ray(*op, r.clone());
                }
            }
            if let Some(v) = lone_variable(r) {
                if !l.variables().iter().any(|x| x == v) {
                    return ray(flip(*op), l.clone());
                }
            }
        }
        ([lo, x, hi], [op1, op2]) if lone_variable(x).is_some() => {
            let bracket = |op: RelOp, strict: u8, closed: u8| {
                if matches!(op, RelOp::Lt | RelOp::Gt) {
                    strict
                } else {
                    closed
                }
            };
            let ascending =
                matches!(op1, RelOp::Lt | RelOp::Le) && matches!(op2, RelOp::Lt | RelOp::Le);
            let descending =
                matches!(op1, RelOp::Gt | RelOp::Ge) && matches!(op2, RelOp::Gt | RelOp::Ge);
            if ascending {
                return Answer::Bracketed(
                    bracket(*op1, b'(', b'['),
                    bracket(*op2, b')', b']'),
                    vec![Answer::Expr(lo.clone()), Answer::Expr(hi.clone())],
                );
            }
            if descending {
                return Answer::Bracketed(
                    bracket(*op2, b'(', b'['),
                    bracket(*op1, b')', b']'),
                    vec![Answer::Expr(hi.clone()), Answer::Expr(lo.clone())],
                );
            }
        }
        _ => {}
    }
    Answer::Relation(sides, ops)
}

/// Compares two relations as written (before [`reduce`]): `2x - y + 3 = 0` vs `y = 2x + 3`.
pub fn same_relations(a: &Answer, b: &Answer, ctx: &mut Ctx) -> Option<Judgement> {
    match (a, b) {
        (Answer::Relation(s1, o1), Answer::Relation(s2, o2)) => {
            compare_relations(s1, o1, s2, o2, ctx)
        }
        _ => Some(judged(false, "kind-mismatch")),
    }
}

/// Compares two reduced answers. None when the time budget ran out.
pub fn same(a: &Answer, b: &Answer, ctx: &mut Ctx) -> Option<Judgement> {
    ctx.budget.tick()?;
    let j = match (a, b) {
        (Answer::Expr(x), Answer::Expr(y)) => compare_exprs(x, y, ctx)?,
        (Answer::Bracketed(o1, c1, xs), Answer::Bracketed(o2, c2, ys)) => {
            let rule = if xs.len() == 2 {
                "interval-or-tuple"
            } else {
                "tuple-ordered"
            };
            if (o1, c1) != (o2, c2) {
                judged(false, "bracket-mismatch")
            } else {
                judged(all_in_order(xs, ys, ctx)?, rule)
            }
        }
        (Answer::Set(xs) | Answer::List(xs), Answer::Set(ys) | Answer::List(ys)) => {
            judged(same_multiset(xs, ys, ctx)?, "set-unordered")
        }
        (Answer::Union(xs) | Answer::List(xs), Answer::Union(ys))
        | (Answer::Union(xs), Answer::List(ys)) => {
            judged(same_multiset(xs, ys, ctx)?, "interval-union")
        }
        (Answer::Matrix(xs), Answer::Matrix(ys)) => {
            let mut equal = xs.len() == ys.len();
            for (x, y) in xs.iter().zip(ys) {
                equal = equal && all_in_order(x, y, ctx)?;
            }
            judged(equal, "matrix-entries")
        }
        (Answer::Relation(s1, o1), Answer::Relation(s2, o2)) => {
            compare_relations(s1, o1, s2, o2, ctx)?
        }
        (Answer::Choice(x), Answer::Choice(y)) => judged(x == y, "choice-letter"),
        (Answer::Text(x), Answer::Text(y)) => judged(x == y, "text"),
        _ => judged(false, "kind-mismatch"),
    };
    Some(j)
}

fn all_in_order(xs: &[Answer], ys: &[Answer], ctx: &mut Ctx) -> Option<bool> {
    if xs.len() != ys.len() {
        return Some(false);
    }
    for (x, y) in xs.iter().zip(ys) {
        if !same(x, y, ctx)?.equal {
            return Some(false);
        }
    }
    Some(true)
}

/// Whether every element of `xs` pairs with a distinct equivalent element of `ys`. Greedy
/// pairing is exact when equivalence is transitive (it is, except at the tolerance edge).
fn same_multiset(xs: &[Answer], ys: &[Answer], ctx: &mut Ctx) -> Option<bool> {
    if xs.len() != ys.len() {
        return Some(false);
    }
    let mut used = vec![false; ys.len()];
    for x in xs {
        let mut hit = false;
        for (y, taken) in ys.iter().zip(used.iter_mut()) {
            if !*taken && same(x, y, ctx)?.equal {
                *taken = true;
                hit = true;
                break;
            }
        }
        if !hit {
            return Some(false);
        }
    }
    Some(true)
}

/// Variables of both expressions, sorted and deduplicated.
fn shared_variables(a: &Expr, b: &Expr) -> Vec<String> {
    let mut vars = a.variables();
    vars.extend(b.variables());
    vars.sort();
    vars.dedup();
    vars
}

fn compare_exprs(a: &Expr, b: &Expr, ctx: &mut Ctx) -> Option<Judgement> {
    if a.has_infinity() || b.has_infinity() {
        let equal = a.infinity_sign().is_some() && a.infinity_sign() == b.infinity_sign();
        return Some(judged(equal, "infinity"));
    }
    let vars = shared_variables(a, b);
    if vars.is_empty() {
        let va = eval_value(a, &mut ctx.budget);
        let vb = eval_value(b, &mut ctx.budget);
        if ctx.budget.expired() {
            return None;
        }
        return Some(match (va, vb) {
            (Some(Value::Exact(x)), Some(Value::Exact(y))) => {
                let rule = if x.is_terminating() == y.is_terminating() {
                    "exact-rational"
                } else {
                    "numeric-tolerance"
                };
                judged(
                    values_equal(Value::Exact(x), Value::Exact(y), ctx.rel_tol),
                    rule,
                )
            }
            (Some(x), Some(y)) => judged(values_equal(x, y, ctx.rel_tol), "numeric-tolerance"),
            _ => judged(false, "not-a-number"),
        });
    }
    let mut valid = 0;
    for point in points(vars.len()) {
        let fa = eval_f64(a, &vars, &point, &mut ctx.budget);
        let fb = eval_f64(b, &vars, &point, &mut ctx.budget);
        if ctx.budget.expired() {
            return None;
        }
        if let (Some(x), Some(y)) = (fa, fb) {
            if (x - y).abs() > POINT_TOL * x.abs().max(y.abs()).max(1.0) {
                return Some(judged(false, "random-points"));
            }
            valid += 1;
        }
    }
    Some(judged(valid >= MIN_VALID_POINTS, "random-points"))
}

/// [`POINTS`] deterministic points (SplitMix64, fixed seed) with coordinates of magnitude in
/// [0.1, 3): the first half all positive (so `\ln x + \ln y` vs `\ln(xy)` has points in its
/// domain), the rest with random signs (so `|x|` vs `x` is told apart).
fn points(n: usize) -> Vec<Vec<f64>> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..POINTS)
        .map(|k| {
            (0..n)
                .map(|_| {
                    let magnitude = 0.1 + 2.9 * next();
                    if next() < 0.5 && k >= POINTS / 2 {
                        -magnitude
                    } else {
                        magnitude
                    }
                })
                .collect()
        })
        .collect()
}

/// `lhs - rhs` for an equation; `greater - lesser` and strictness for an inequality.
fn difference(l: &Expr, r: &Expr, op: RelOp) -> Option<(Expr, bool)> {
    let sub = |a: &Expr, b: &Expr| Expr::Sub(Box::new(a.clone()), Box::new(b.clone()));
    match op {
        RelOp::Eq => Some((sub(l, r), false)),
        RelOp::Lt => Some((sub(r, l), true)),
        RelOp::Le => Some((sub(r, l), false)),
        RelOp::Gt => Some((sub(l, r), true)),
        RelOp::Ge => Some((sub(l, r), false)),
        RelOp::Ne => None,
    }
}

/// Equations agree when `l1 - r1 = k (l2 - r2)` for a constant k ≠ 0 (a rearranged or
/// rescaled equation); inequalities when k > 0 and both are strict or both are not.
fn compare_relations(
    s1: &[Expr],
    o1: &[RelOp],
    s2: &[Expr],
    o2: &[RelOp],
    ctx: &mut Ctx,
) -> Option<Judgement> {
    let (([l1, r1], [op1]), ([l2, r2], [op2])) = ((s1, o1), (s2, o2)) else {
        let mut equal = o1 == o2 && s1.len() == s2.len();
        for (x, y) in s1.iter().zip(s2) {
            equal = equal && compare_exprs(x, y, ctx)?.equal;
        }
        return Some(judged(equal, "relation-sides"));
    };
    let is_eq = |op: &RelOp| *op == RelOp::Eq;
    if is_eq(op1) != is_eq(op2) {
        return Some(judged(false, "relation-kind"));
    }
    let rule = if is_eq(op1) {
        "equation-rearranged"
    } else {
        "inequality-rearranged"
    };
    let (Some((d1, strict1)), Some((d2, strict2))) =
        (difference(l1, r1, *op1), difference(l2, r2, *op2))
    else {
        let equal =
            op1 == op2 && compare_exprs(l1, l2, ctx)?.equal && compare_exprs(r1, r2, ctx)?.equal;
        return Some(judged(equal, "relation-sides"));
    };
    if strict1 != strict2 {
        return Some(judged(false, rule));
    }
    let vars = shared_variables(&d1, &d2);
    let (mut ratio, mut valid) = (None::<f64>, 0);
    for point in points(vars.len()) {
        let x = eval_f64(&d1, &vars, &point, &mut ctx.budget);
        let y = eval_f64(&d2, &vars, &point, &mut ctx.budget);
        if ctx.budget.expired() {
            return None;
        }
        let (Some(x), Some(y)) = (x, y) else { continue };
        if y.abs() < 1e-9 || x.abs() < 1e-9 {
            if (x.abs() < 1e-9) != (y.abs() < 1e-9) {
                return Some(judged(false, rule));
            }
            continue;
        }
        let k = x / y;
        match ratio {
            None => ratio = Some(k),
            Some(k0) if (k - k0).abs() > POINT_TOL * k0.abs().max(1.0) => {
                return Some(judged(false, rule))
            }
            Some(_) => {}
        }
        valid += 1;
    }
    let sign_ok = ratio.is_some_and(|k| is_eq(op1) || k > 0.0);
    Some(judged(valid >= MIN_VALID_POINTS && sign_ok, rule))
}

/// `x` divided by 100 (the value of `x%`).
pub fn percent_of(e: &Expr) -> Expr {
    Expr::Div(
        Box::new(e.clone()),
        Box::new(Expr::Num(Value::Exact(Ratio::int(100)))),
    )
}

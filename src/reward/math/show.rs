//! A plain-text rendering of an [`Expr`] for audits (`grove verify --pairs`).

use super::expr::{Constant, Expr, Func};
use super::numeric::Value;

/// The expression in plain notation, fully parenthesised where precedence could mislead.
pub fn show(e: &Expr) -> String {
    match e {
        Expr::Num(Value::Exact(r)) if r.den == 1 => r.num.to_string(),
        Expr::Num(Value::Exact(r)) => format!("{}/{}", r.num, r.den),
        Expr::Num(Value::Approx(x)) => format!("{x}"),
        Expr::Const(Constant::Pi) => "pi".to_string(),
        Expr::Const(Constant::E) => "e".to_string(),
        Expr::Const(Constant::Infinity) => "inf".to_string(),
        Expr::Var(v) => v.clone(),
        Expr::Add(a, b) => format!("({} + {})", show(a), show(b)),
        Expr::Sub(a, b) => format!("({} - {})", show(a), show(b)),
        Expr::Mul(a, b) => format!("{}*{}", show(a), show(b)),
        Expr::Div(a, b) => format!("{}/{}", show(a), show(b)),
        Expr::Pow(a, b) => format!("{}^{}", show(a), show(b)),
        Expr::Neg(a) => format!("-{}", show(a)),
        Expr::Root(2, a) => format!("sqrt({})", show(a)),
        Expr::Root(n, a) => format!("root{n}({})", show(a)),
        Expr::Log(b, x) => format!("log_{}({})", show(b), show(x)),
        Expr::Binom(n, k) => format!("binom({}, {})", show(n), show(k)),
        Expr::PlusMinus(a, b) => format!("({} ± {})", show(a), show(b)),
        Expr::Func(Func::Factorial, a) => format!("{}!", show(a)),
        Expr::Func(f, a) => format!("{}({})", func_name(*f), show(a)),
    }
}

/// The value of a variable-free expression, as `3`, `1/3` or `1.414213562`.
pub fn value_of(e: &Expr) -> Option<String> {
    if !e.variables().is_empty() {
        return None;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(5);
    let v = super::eval::eval_value(e, &mut super::eval::Budget::until(deadline))?;
    Some(match v {
        Value::Exact(r) if r.den == 1 => r.num.to_string(),
        Value::Exact(r) => format!("{}/{}", r.num, r.den),
        Value::Approx(x) => format!("{x:.10}"),
    })
}

fn func_name(f: Func) -> &'static str {
    match f {
        Func::Sin => "sin",
        Func::Cos => "cos",
        Func::Tan => "tan",
        Func::Cot => "cot",
        Func::Sec => "sec",
        Func::Csc => "csc",
        Func::Asin => "asin",
        Func::Acos => "acos",
        Func::Atan => "atan",
        Func::Exp => "exp",
        Func::Abs => "abs",
        Func::Floor => "floor",
        Func::Ceil => "ceil",
        Func::Factorial => "factorial",
    }
}

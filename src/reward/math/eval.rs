//! Evaluation of an [`Expr`]: exactly (rationals, when there are no variables) or in floating
//! point at a point (one value per variable), under a time budget.

use std::time::Instant;

use super::expr::{Constant, Expr, Func};
use super::numeric::{finite, Ratio, Value};

/// Largest n for which `n!` is computed (171! overflows f64).
const MAX_FACTORIAL: i128 = 170;

/// A deadline shared by every step of one comparison; once passed, all evaluation fails and
/// the comparison reports a timeout instead of an answer.
#[derive(Debug)]
pub struct Budget {
    deadline: Instant,
    steps: u32,
    expired: bool,
}

impl Budget {
    pub fn until(deadline: Instant) -> Self {
        Budget {
            deadline,
            steps: 0,
            expired: Instant::now() >= deadline,
        }
    }

    /// Counts one unit of work; reads the clock every 64 units. None once the deadline passed.
    pub fn tick(&mut self) -> Option<()> {
        self.steps = self.steps.wrapping_add(1);
        if !self.expired && self.steps.is_multiple_of(64) {
            self.expired = Instant::now() >= self.deadline;
        }
        (!self.expired).then_some(())
    }

    pub fn expired(&self) -> bool {
        self.expired
    }
}

/// The exact (or, for irrational steps, floating-point) value of a variable-free expression.
pub fn eval_value(e: &Expr, budget: &mut Budget) -> Option<Value> {
    budget.tick()?;
    let v = match e {
        Expr::Num(v) => *v,
        Expr::Const(Constant::Pi) => Value::Approx(std::f64::consts::PI),
        Expr::Const(Constant::E) => Value::Approx(std::f64::consts::E),
        Expr::Const(Constant::Infinity) | Expr::Var(_) | Expr::PlusMinus(..) => return None,
        Expr::Add(a, b) => eval_value(a, budget)?.add(eval_value(b, budget)?)?,
        Expr::Sub(a, b) => eval_value(a, budget)?.sub(eval_value(b, budget)?)?,
        Expr::Mul(a, b) => eval_value(a, budget)?.mul(eval_value(b, budget)?)?,
        Expr::Div(a, b) => eval_value(a, budget)?.div(eval_value(b, budget)?)?,
        Expr::Pow(a, b) => eval_value(a, budget)?.pow(eval_value(b, budget)?)?,
        Expr::Neg(a) => eval_value(a, budget)?.neg(),
        Expr::Root(n, a) => eval_value(a, budget)?.root(*n)?,
        Expr::Binom(n, k) => binom(eval_value(n, budget)?, eval_value(k, budget)?)?,
        Expr::Func(f, a) => apply_exact(*f, eval_value(a, budget)?)?,
        Expr::Log(base, x) => {
            let (base, x) = (eval_value(base, budget)?, eval_value(x, budget)?);
            exact_log(base, x).or_else(|| finite(x.to_f64().ln() / base.to_f64().ln()))?
        }
    };
    Some(v)
}

/// `log_b x` exactly when x is an integer power of an integer base (`\log_2 8` = 3).
fn exact_log(base: Value, x: Value) -> Option<Value> {
    let (Value::Exact(b), Value::Exact(x)) = (base, x) else {
        return None;
    };
    if b.den != 1 || x.den != 1 || b.num < 2 || x.num < 1 {
        return None;
    }
    let (mut acc, mut k) = (1i128, 0i128);
    while acc < x.num {
        acc = acc.checked_mul(b.num)?;
        k += 1;
    }
    (acc == x.num).then_some(Value::Exact(Ratio::int(k)))
}

fn apply_exact(f: Func, x: Value) -> Option<Value> {
    match (f, x) {
        (Func::Abs, Value::Exact(r)) => Ratio::new(r.num.abs(), r.den).map(Value::Exact),
        (Func::Floor, Value::Exact(r)) => Some(Value::Exact(Ratio::int(r.num.div_euclid(r.den)))),
        (Func::Ceil, Value::Exact(r)) => {
            Some(Value::Exact(Ratio::int(-(-r.num).div_euclid(r.den))))
        }
        (Func::Factorial, Value::Exact(r)) if r.den == 1 => factorial(r.num),
        (Func::Factorial, _) => None,
        _ => finite(apply_f64(f, x.to_f64())?),
    }
}

fn factorial(n: i128) -> Option<Value> {
    if !(0..=MAX_FACTORIAL).contains(&n) {
        return None;
    }
    let mut acc = Value::Exact(Ratio::int(1));
    for k in 2..=n {
        acc = acc.mul(Value::Exact(Ratio::int(k)))?;
    }
    Some(acc)
}

fn binom(n: Value, k: Value) -> Option<Value> {
    let (Value::Exact(n), Value::Exact(k)) = (n, k) else {
        return None;
    };
    if n.den != 1 || k.den != 1 || k.num < 0 || n.num < 0 || k.num > n.num || k.num > 1000 {
        return None;
    }
    let k = k.num.min(n.num - k.num);
    let mut acc = Value::Exact(Ratio::int(1));
    for i in 0..k {
        acc = acc
            .mul(Value::Exact(Ratio::int(n.num - i)))?
            .div(Value::Exact(Ratio::int(i + 1)))?;
    }
    Some(acc)
}

fn apply_f64(f: Func, x: f64) -> Option<f64> {
    let y = match f {
        Func::Sin => x.sin(),
        Func::Cos => x.cos(),
        Func::Tan => x.tan(),
        Func::Cot => 1.0 / x.tan(),
        Func::Sec => 1.0 / x.cos(),
        Func::Csc => 1.0 / x.sin(),
        Func::Asin => x.asin(),
        Func::Acos => x.acos(),
        Func::Atan => x.atan(),
        Func::Exp => x.exp(),
        Func::Abs => x.abs(),
        Func::Floor => x.floor(),
        Func::Ceil => x.ceil(),
        Func::Factorial => {
            if x.fract() != 0.0 || !(0.0..=170.0).contains(&x) {
                return None;
            }
            (2..=x as u32).map(f64::from).product()
        }
    };
    y.is_finite().then_some(y)
}

/// The value at a point: `vars[i]` takes `point[i]`. None for undefined points (1/0, √-1).
pub fn eval_f64(e: &Expr, vars: &[String], point: &[f64], budget: &mut Budget) -> Option<f64> {
    budget.tick()?;
    let mut go = |x: &Expr| eval_f64(x, vars, point, budget);
    let y = match e {
        Expr::Num(v) => v.to_f64(),
        Expr::Const(Constant::Pi) => std::f64::consts::PI,
        Expr::Const(Constant::E) => std::f64::consts::E,
        Expr::Const(Constant::Infinity) | Expr::PlusMinus(..) => return None,
        Expr::Var(name) => *point.get(vars.iter().position(|v| v == name)?)?,
        Expr::Add(a, b) => go(a)? + go(b)?,
        Expr::Sub(a, b) => go(a)? - go(b)?,
        Expr::Mul(a, b) => go(a)? * go(b)?,
        Expr::Div(a, b) => go(a)? / go(b)?,
        Expr::Pow(a, b) => {
            let (base, exp) = (go(a)?, go(b)?);
            if base < 0.0 && exp.fract() != 0.0 {
                return None;
            }
            base.powf(exp)
        }
        Expr::Neg(a) => -go(a)?,
        Expr::Root(n, a) => {
            let x = go(a)?;
            if x < 0.0 && n % 2 == 0 {
                return None;
            }
            x.signum() * x.abs().powf(1.0 / f64::from(*n))
        }
        Expr::Binom(n, k) => {
            let (n, k) = (go(n)?, go(k)?);
            let exact = binom(
                Value::Exact(Ratio::int(n as i128)),
                Value::Exact(Ratio::int(k as i128)),
            )?;
            if n.fract() != 0.0 || k.fract() != 0.0 {
                return None;
            }
            exact.to_f64()
        }
        Expr::Func(f, a) => apply_f64(*f, go(a)?)?,
        Expr::Log(base, x) => {
            let (base, x) = (go(base)?, go(x)?);
            if x <= 0.0 || base <= 0.0 {
                return None;
            }
            x.ln() / base.ln()
        }
    };
    y.is_finite().then_some(y)
}

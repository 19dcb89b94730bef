//! Exact rationals (i128) with a floating-point fallback: the numbers the verifier computes with.
//!
//! Arithmetic stays exact while it fits in i128 and falls back to f64 on overflow, so
//! `9007199254740993 != 9007199254740992` (beyond f64) yet `10^{30}` still evaluates.

/// Most significant digits read exactly into an i128 rational (10^36 < i128::MAX ≈ 1.7e38).
pub const MAX_EXACT_DIGITS: usize = 36;

/// A reduced fraction num/den with den > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    pub num: i128,
    pub den: i128,
}

pub fn gcd(mut a: i128, mut b: i128) -> i128 {
    // Works on non-negative values; callers pass unsigned_abs-safe magnitudes.
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a.abs()
}

impl Ratio {
    pub fn new(num: i128, den: i128) -> Option<Self> {
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

    pub fn int(n: i128) -> Self {
        Self { num: n, den: 1 }
    }

    pub fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }

    pub fn add(self, o: Self) -> Option<Self> {
        let num = self
            .num
            .checked_mul(o.den)?
            .checked_add(o.num.checked_mul(self.den)?)?;
        Self::new(num, self.den.checked_mul(o.den)?)
    }

    pub fn mul(self, o: Self) -> Option<Self> {
        // Cross-reduce first to delay overflow.
        let g1 = gcd(self.num.abs(), o.den).max(1);
        let g2 = gcd(o.num.abs(), self.den).max(1);
        Self::new(
            (self.num / g1).checked_mul(o.num / g2)?,
            (self.den / g2).checked_mul(o.den / g1)?,
        )
    }

    pub fn recip(self) -> Option<Self> {
        Self::new(self.den, self.num)
    }

    pub fn pow(self, exp: i128) -> Option<Self> {
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
    pub fn is_terminating(self) -> bool {
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
pub enum Value {
    Exact(Ratio),
    Approx(f64),
}

impl Value {
    pub fn to_f64(self) -> f64 {
        match self {
            Value::Exact(r) => r.to_f64(),
            Value::Approx(x) => x,
        }
    }

    /// Applies an exact operation, falling back to floating point on overflow.
    pub fn combine(
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

    pub fn add(self, o: Value) -> Option<Value> {
        self.combine(o, Ratio::add, |a, b| a + b)
    }

    pub fn sub(self, o: Value) -> Option<Value> {
        self.add(o.neg())
    }

    pub fn mul(self, o: Value) -> Option<Value> {
        self.combine(o, Ratio::mul, |a, b| a * b)
    }

    pub fn div(self, o: Value) -> Option<Value> {
        if o.to_f64() == 0.0 {
            return None;
        }
        self.combine(o, |a, b| a.mul(b.recip()?), |a, b| a / b)
    }

    pub fn neg(self) -> Value {
        match self {
            Value::Exact(r) => Value::Exact(Ratio {
                num: -r.num,
                den: r.den,
            }),
            Value::Approx(x) => Value::Approx(-x),
        }
    }

    pub fn pow(self, e: Value) -> Option<Value> {
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

    pub fn root(self, n: u32) -> Option<Value> {
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

pub fn finite(x: f64) -> Option<Value> {
    x.is_finite().then_some(Value::Approx(x))
}

/// The integer n-th root of `v` when `v` is a perfect n-th power.
pub fn exact_root(v: i128, n: u32) -> Option<i128> {
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

pub fn values_equal(a: Value, b: Value, rel_tol: f64) -> bool {
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

/// Parses `123`, `1.5`, `.5`, `5.` exactly when it has at most [`MAX_EXACT_DIGITS`] digits.
pub fn parse_decimal(literal: &str) -> Option<Value> {
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

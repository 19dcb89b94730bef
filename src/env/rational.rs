//! Exact rational arithmetic over i128 and a small expression parser (+ − × ÷, parentheses,
//! unary minus, decimals), shared by the calculator tool and the countdown checker. Every
//! operation is checked: an overflow or a division by zero is an error, never a wrong value.
use std::fmt;

/// num/den in lowest terms, den > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    num: i128,
    den: i128,
}

const OVERFLOW: &str = "overflow: the exact result does not fit in 128-bit integers";

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs()
}

impl Rational {
    pub fn integer(n: i128) -> Self {
        Rational { num: n, den: 1 }
    }

    pub fn new(num: i128, den: i128) -> Result<Self, String> {
        if den == 0 {
            return Err("division by zero".into());
        }
        let g = gcd(num, den).max(1);
        let (mut num, mut den) = (num / g, den / g);
        if den < 0 {
            num = num.checked_neg().ok_or(OVERFLOW)?;
            den = den.checked_neg().ok_or(OVERFLOW)?;
        }
        Ok(Rational { num, den })
    }

    pub fn numer(&self) -> i128 {
        self.num
    }
    pub fn denom(&self) -> i128 {
        self.den
    }

    pub fn checked_add(self, o: Self) -> Result<Self, String> {
        // a/b + c/d = (a·(l/b) + c·(l/d)) / l with l = lcm(b, d): smaller intermediates.
        let g = gcd(self.den, o.den);
        let l = (self.den / g).checked_mul(o.den).ok_or(OVERFLOW)?;
        let a = self.num.checked_mul(l / self.den).ok_or(OVERFLOW)?;
        let c = o.num.checked_mul(l / o.den).ok_or(OVERFLOW)?;
        Rational::new(a.checked_add(c).ok_or(OVERFLOW)?, l)
    }

    pub fn checked_neg(self) -> Result<Self, String> {
        Ok(Rational {
            num: self.num.checked_neg().ok_or(OVERFLOW)?,
            den: self.den,
        })
    }

    pub fn checked_sub(self, o: Self) -> Result<Self, String> {
        self.checked_add(o.checked_neg()?)
    }

    pub fn checked_mul(self, o: Self) -> Result<Self, String> {
        // Cross-cancel first so that products of reduced fractions stay small.
        let g1 = gcd(self.num, o.den).max(1);
        let g2 = gcd(o.num, self.den).max(1);
        let num = (self.num / g1).checked_mul(o.num / g2).ok_or(OVERFLOW)?;
        let den = (self.den / g2).checked_mul(o.den / g1).ok_or(OVERFLOW)?;
        Rational::new(num, den)
    }

    pub fn checked_div(self, o: Self) -> Result<Self, String> {
        if o.num == 0 {
            return Err("division by zero".into());
        }
        self.checked_mul(Rational::new(o.den, o.num)?)
    }
}

impl fmt::Display for Rational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal, with its text (countdown checks which numbers were used).
    Num(Rational, String),
    Neg(Box<Expr>),
    Bin(char, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn eval(&self) -> Result<Rational, String> {
        match self {
            Expr::Num(v, _) => Ok(*v),
            Expr::Neg(e) => e.eval()?.checked_neg(),
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval()?, b.eval()?);
                match op {
                    '+' => a.checked_add(b),
                    '-' => a.checked_sub(b),
                    '*' => a.checked_mul(b),
                    _ => a.checked_div(b),
                }
            }
        }
    }

    /// The literals in order of appearance.
    pub fn literals(&self) -> Vec<&str> {
        match self {
            Expr::Num(_, s) => vec![s.as_str()],
            Expr::Neg(e) => e.literals(),
            Expr::Bin(_, a, b) => {
                let mut v = a.literals();
                v.extend(b.literals());
                v
            }
        }
    }

    pub fn has_negation(&self) -> bool {
        match self {
            Expr::Num(..) => false,
            Expr::Neg(_) => true,
            Expr::Bin(_, a, b) => a.has_negation() || b.has_negation(),
        }
    }
}

/// Longest expression and deepest nesting accepted (recursion stays bounded).
const MAX_CHARS: usize = 2000;
const MAX_DEPTH: usize = 64;

struct Parser {
    chars: Vec<char>,
    at: usize,
    depth: usize,
}

/// Parses an arithmetic expression: numbers (`12`, `1.5`), `+ - * /` (also `− × ÷`),
/// parentheses and unary minus. Errors name the character position (from 1).
pub fn parse(text: &str) -> Result<Expr, String> {
    if text.chars().count() > MAX_CHARS {
        return Err(format!("expression longer than {MAX_CHARS} characters"));
    }
    let chars = text
        .chars()
        .map(|c| match c {
            '−' => '-',
            '×' => '*',
            '÷' => '/',
            c => c,
        })
        .collect();
    let mut p = Parser {
        chars,
        at: 0,
        depth: 0,
    };
    let e = p.sum()?;
    p.skip_ws();
    match p.peek() {
        None => Ok(e),
        Some(c) => Err(p.unexpected(c, "an operator or the end")),
    }
}

/// Parses and evaluates.
pub fn evaluate(text: &str) -> Result<Rational, String> {
    parse(text)?.eval()
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }
    fn unexpected(&self, c: char, expected: &str) -> String {
        format!(
            "at character {}: expected {expected}, found {c:?}",
            self.at + 1
        )
    }
    fn sum(&mut self) -> Result<Expr, String> {
        let mut e = self.product()?;
        loop {
            self.skip_ws();
            match self.peek() {
                Some(op @ ('+' | '-')) => {
                    self.at += 1;
                    e = Expr::Bin(op, Box::new(e), Box::new(self.product()?));
                }
                _ => return Ok(e),
            }
        }
    }
    fn product(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        loop {
            self.skip_ws();
            match self.peek() {
                Some(op @ ('*' | '/')) => {
                    self.at += 1;
                    e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
                }
                _ => return Ok(e),
            }
        }
    }
    fn unary(&mut self) -> Result<Expr, String> {
        self.skip_ws();
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("expression nested deeper than {MAX_DEPTH} levels"));
        }
        let e = match self.peek() {
            Some('-') => {
                self.at += 1;
                Expr::Neg(Box::new(self.unary()?))
            }
            Some('(') => {
                self.at += 1;
                let e = self.sum()?;
                self.skip_ws();
                match self.peek() {
                    Some(')') => self.at += 1,
                    Some(c) => return Err(self.unexpected(c, "')'")),
                    None => return Err("unclosed '(' at the end of the expression".into()),
                }
                e
            }
            Some(c) if c.is_ascii_digit() => self.number()?,
            Some(c) => return Err(self.unexpected(c, "a number or '('")),
            None => return Err("expected a number, found the end of the expression".into()),
        };
        self.depth -= 1;
        Ok(e)
    }
    fn number(&mut self) -> Result<Expr, String> {
        let start = self.at;
        let digits = |p: &mut Parser| {
            let s = p.at;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.at += 1;
            }
            p.chars[s..p.at].iter().collect::<String>()
        };
        let int = digits(self);
        let mut frac = String::new();
        if self.peek() == Some('.') {
            self.at += 1;
            frac = digits(self);
        }
        let text: String = self.chars[start..self.at].iter().collect();
        let too_big = || format!("number {text} does not fit in 128-bit integers");
        let num: i128 = format!("{int}{frac}").parse().map_err(|_| too_big())?;
        let den = 10i128.checked_pow(frac.len() as u32).ok_or_else(too_big)?;
        Ok(Expr::Num(Rational::new(num, den)?, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str) -> String {
        match evaluate(s) {
            Ok(v) => v.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn hand_computed_values() {
        assert_eq!(ev("1 + 2 * 3"), "7");
        assert_eq!(ev("(1 + 2) * 3"), "9");
        assert_eq!(ev("7 / 3"), "7/3");
        // 1/3 + 1/6 = 2/6 + 1/6 = 3/6 = 1/2
        assert_eq!(ev("1/3 + 1/6"), "1/2");
        assert_eq!(ev("2 - 5"), "-3");
        assert_eq!(ev("-(4 - 10) / -4"), "-3/2");
        assert_eq!(ev("1.5 * 4"), "6");
        assert_eq!(ev("10 − 4 × 2 ÷ 8"), "9"); // 10 − 1
        assert_eq!(ev("8 / 4 / 2"), "1"); // left-associative
        assert_eq!(ev("8 - 4 - 2"), "2");
        // 123456789012 × 987654321 = 121932631124487120852
        assert_eq!(ev("123456789012 * 987654321"), "121932631124487120852");
    }

    #[test]
    fn errors_are_messages_not_panics() {
        assert_eq!(ev("1/0"), "error: division by zero");
        assert_eq!(ev("1/(2-2)"), "error: division by zero");
        assert!(ev("99999999999999999999 * 99999999999999999999").contains("overflow"));
        assert!(ev("999999999999999999999999999999999999999999").contains("does not fit"));
        assert_eq!(
            ev("1 +"),
            "error: expected a number, found the end of the expression"
        );
        assert_eq!(
            ev("2 x 3"),
            "error: at character 3: expected an operator or the end, found 'x'"
        );
        assert_eq!(
            ev("(1 + 2"),
            "error: unclosed '(' at the end of the expression"
        );
        assert!(ev(&"(".repeat(100)).contains("nested deeper"));
        assert!(ev(&"1+".repeat(2000)).contains("longer than"));
    }

    #[test]
    fn literals_are_listed_in_order() {
        let e = parse("(25 - 5) * 4 + 100").unwrap();
        assert_eq!(e.literals(), vec!["25", "5", "4", "100"]);
        assert!(!e.has_negation());
        assert!(parse("-3 + 4").unwrap().has_negation());
    }
}

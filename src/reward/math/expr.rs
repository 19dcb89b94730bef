//! The expression tree of a math answer and a recursive-descent parser from normalised
//! LaTeX / plain math (see [`super::normalize`]) to it.
//!
//! Grammar (implicit multiplication between adjacent factors: `2x`, `3\sqrt2`, `(a+b)(a-b)`):
//! ```text
//! expr    := term (('+' | '-' | \pm | \mp) term)*
//! term    := unary (('*' | \cdot | \times | '/' | \div)? unary)*
//! unary   := ('-' | '+' | \pm) unary | power
//! power   := postfix ('^' exponent)?        exponent: {expr}, one digit, one letter, a primary
//! postfix := primary '!'*
//! primary := number [mixed \frac] | (expr) | {expr} | |expr| | \frac A B | \sqrt[n] A
//!          | \binom A B | \lfloor expr \rfloor | \lceil expr \rceil | function argument
//!          | \pi | \infty | e | variable (one letter or Greek command, optional subscript)
//! ```
//! A run of three or more letters that is not a known function name (`sin`, `log`, `sqrt`,
//! ...) is a word, not a product of variables: such answers compare as text.

use super::numeric::{parse_decimal, Value};

/// Deepest nesting the parser follows before giving up.
pub const MAX_EVAL_DEPTH: usize = 48;
/// Longest normalised expression (bytes) the parser reads.
pub const MAX_EXPR_BYTES: usize = 512;

/// Named constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Constant {
    Pi,
    E,
    Infinity,
}

/// One-argument functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Sin,
    Cos,
    Tan,
    Cot,
    Sec,
    Csc,
    Asin,
    Acos,
    Atan,
    Exp,
    Abs,
    Floor,
    Ceil,
    Factorial,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal; `decimals` is how many digits it had after the point (for audits).
    Num(Value),
    Const(Constant),
    Var(String),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    /// n-th root.
    Root(u32, Box<Expr>),
    /// `\log_b x` (base first); `\ln x` has base e and `\log x` base 10.
    Log(Box<Expr>, Box<Expr>),
    Binom(Box<Expr>, Box<Expr>),
    Func(Func, Box<Expr>),
    /// `a \pm b`: two answers, expanded before comparison.
    PlusMinus(Box<Expr>, Box<Expr>),
}

impl Expr {
    fn int(n: i128) -> Expr {
        Expr::Num(Value::Exact(super::numeric::Ratio::int(n)))
    }

    /// Variable names appearing in the expression, sorted and deduplicated.
    pub fn variables(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_variables(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_variables(&self, out: &mut Vec<String>) {
        match self {
            Expr::Var(name) => out.push(name.clone()),
            Expr::Num(_) | Expr::Const(_) => {}
            Expr::Neg(a) | Expr::Root(_, a) | Expr::Func(_, a) => a.collect_variables(out),
            Expr::Add(a, b)
            | Expr::Sub(a, b)
            | Expr::Mul(a, b)
            | Expr::Div(a, b)
            | Expr::Pow(a, b)
            | Expr::Log(a, b)
            | Expr::Binom(a, b)
            | Expr::PlusMinus(a, b) => {
                a.collect_variables(out);
                b.collect_variables(out);
            }
        }
    }

    /// Whether `\pm` occurs anywhere.
    pub fn has_plus_minus(&self) -> bool {
        match self {
            Expr::PlusMinus(..) => true,
            Expr::Num(_) | Expr::Const(_) | Expr::Var(_) => false,
            Expr::Neg(a) | Expr::Root(_, a) | Expr::Func(_, a) => a.has_plus_minus(),
            Expr::Add(a, b)
            | Expr::Sub(a, b)
            | Expr::Mul(a, b)
            | Expr::Div(a, b)
            | Expr::Pow(a, b)
            | Expr::Log(a, b)
            | Expr::Binom(a, b) => a.has_plus_minus() || b.has_plus_minus(),
        }
    }

    /// The two readings of the first `\pm` (`+` then `-`); other nodes are cloned.
    pub fn split_plus_minus(&self) -> Option<(Expr, Expr)> {
        let rebuild2 = |a: &Expr, b: &Expr, make: fn(Box<Expr>, Box<Expr>) -> Expr| {
            if let Some((p, m)) = a.split_plus_minus() {
                return Some((
                    make(Box::new(p), Box::new(b.clone())),
                    make(Box::new(m), Box::new(b.clone())),
                ));
            }
            let (p, m) = b.split_plus_minus()?;
            Some((
                make(Box::new(a.clone()), Box::new(p)),
                make(Box::new(a.clone()), Box::new(m)),
            ))
        };
        match self {
            Expr::PlusMinus(a, b) => Some((
                Expr::Add(a.clone(), b.clone()),
                Expr::Sub(a.clone(), b.clone()),
            )),
            Expr::Num(_) | Expr::Const(_) | Expr::Var(_) => None,
            Expr::Neg(a) => {
                let (p, m) = a.split_plus_minus()?;
                Some((Expr::Neg(Box::new(p)), Expr::Neg(Box::new(m))))
            }
            Expr::Root(n, a) => {
                let (p, m) = a.split_plus_minus()?;
                Some((Expr::Root(*n, Box::new(p)), Expr::Root(*n, Box::new(m))))
            }
            Expr::Func(f, a) => {
                let (p, m) = a.split_plus_minus()?;
                Some((Expr::Func(*f, Box::new(p)), Expr::Func(*f, Box::new(m))))
            }
            Expr::Add(a, b) => rebuild2(a, b, Expr::Add),
            Expr::Sub(a, b) => rebuild2(a, b, Expr::Sub),
            Expr::Mul(a, b) => rebuild2(a, b, Expr::Mul),
            Expr::Div(a, b) => rebuild2(a, b, Expr::Div),
            Expr::Pow(a, b) => rebuild2(a, b, Expr::Pow),
            Expr::Log(a, b) => rebuild2(a, b, Expr::Log),
            Expr::Binom(a, b) => rebuild2(a, b, Expr::Binom),
        }
    }

    /// +1 for `\infty`, -1 for `-\infty`, None for anything else.
    pub fn infinity_sign(&self) -> Option<i8> {
        match self {
            Expr::Const(Constant::Infinity) => Some(1),
            Expr::Neg(a) => a.infinity_sign().map(|s| -s),
            _ => None,
        }
    }

    /// Whether `\infty` occurs anywhere.
    pub fn has_infinity(&self) -> bool {
        match self {
            Expr::Const(Constant::Infinity) => true,
            Expr::Num(_) | Expr::Const(_) | Expr::Var(_) => false,
            Expr::Neg(a) | Expr::Root(_, a) | Expr::Func(_, a) => a.has_infinity(),
            Expr::Add(a, b)
            | Expr::Sub(a, b)
            | Expr::Mul(a, b)
            | Expr::Div(a, b)
            | Expr::Pow(a, b)
            | Expr::Log(a, b)
            | Expr::Binom(a, b)
            | Expr::PlusMinus(a, b) => a.has_infinity() || b.has_infinity(),
        }
    }
}

/// Parses a whole normalised expression; None when any of it is not understood.
pub fn parse_expr(s: &str) -> Option<Expr> {
    if s.is_empty() || s.len() > MAX_EXPR_BYTES || !s.is_ascii() {
        return None;
    }
    let mut p = Parser {
        s: s.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let e = p.expr()?;
    p.skip_spaces();
    (p.pos == p.s.len()).then_some(e)
}

/// Greek letters read as variables.
const GREEK: [&str; 20] = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "phi",
    "varphi",
    "omega",
];

/// Function names (with a backslash, or plain in prose: `sin(x)`, `sqrt(2)`).
const FUNCTIONS: [(&str, Func); 11] = [
    ("sin", Func::Sin),
    ("cos", Func::Cos),
    ("tan", Func::Tan),
    ("cot", Func::Cot),
    ("sec", Func::Sec),
    ("csc", Func::Csc),
    ("arcsin", Func::Asin),
    ("arccos", Func::Acos),
    ("arctan", Func::Atan),
    ("exp", Func::Exp),
    ("abs", Func::Abs),
];

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_spaces(&mut self) {
        while self.s.get(self.pos) == Some(&b' ') {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_spaces();
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

    /// The command name at the cursor (`\frac` → `frac`) without consuming it.
    fn peek_command(&mut self) -> Option<&str> {
        if self.peek() != Some(b'\\') {
            return None;
        }
        let start = self.pos + 1;
        let mut end = start;
        while self.s.get(end).is_some_and(u8::is_ascii_alphabetic) {
            end += 1;
        }
        std::str::from_utf8(self.s.get(start..end)?).ok()
    }

    /// Consumes `\name` if it is next and not the prefix of a longer command.
    fn eat_command(&mut self, name: &str) -> bool {
        if self.peek_command() == Some(name) {
            self.pos += 1 + name.len();
            true
        } else {
            false
        }
    }

    /// A plain (backslash-free) word at the cursor, e.g. `sqrt` in `sqrt(2)`.
    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_spaces();
        let end = self.pos + word.len();
        let hit = self.s.get(self.pos..end) == Some(word.as_bytes())
            && !self.s.get(end).is_some_and(u8::is_ascii_alphabetic);
        if hit {
            self.pos = end;
        }
        hit
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_EVAL_DEPTH).then_some(())
    }

    fn leave<T>(&mut self, v: T) -> Option<T> {
        self.depth -= 1;
        Some(v)
    }

    fn expr(&mut self) -> Option<Expr> {
        self.enter()?;
        let mut acc = self.term()?;
        loop {
            if self.eat(b'+') {
                acc = Expr::Add(Box::new(acc), Box::new(self.term()?));
            } else if self.eat(b'-') {
                acc = Expr::Sub(Box::new(acc), Box::new(self.term()?));
            } else if self.eat_command("pm") || self.eat_command("mp") {
                acc = Expr::PlusMinus(Box::new(acc), Box::new(self.term()?));
            } else {
                return self.leave(acc);
            }
        }
    }

    fn starts_factor(&mut self) -> bool {
        match self.peek() {
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'(' | b'{' | b'.') => true,
            Some(b'\\') => match self.peek_command() {
                Some(name) => {
                    !matches!(
                        name,
                        "cdot" | "times" | "div" | "pm" | "mp" | "right" | "rfloor" | "rceil"
                    ) && !name.is_empty()
                        && !is_relation_command(name)
                }
                None => false,
            },
            _ => false,
        }
    }

    fn term(&mut self) -> Option<Expr> {
        let mut acc = self.unary()?;
        loop {
            if self.eat(b'*') || self.eat_command("cdot") || self.eat_command("times") {
                acc = Expr::Mul(Box::new(acc), Box::new(self.unary()?));
            } else if self.eat(b'/') || self.eat_command("div") {
                acc = Expr::Div(Box::new(acc), Box::new(self.unary()?));
            } else if self.starts_factor() {
                acc = Expr::Mul(Box::new(acc), Box::new(self.power()?));
            } else {
                return Some(acc);
            }
        }
    }

    fn unary(&mut self) -> Option<Expr> {
        self.enter()?;
        let e = if self.eat(b'-') {
            Expr::Neg(Box::new(self.unary()?))
        } else if self.eat(b'+') {
            self.unary()?
        } else if self.eat_command("pm") || self.eat_command("mp") {
            Expr::PlusMinus(Box::new(Expr::int(0)), Box::new(self.unary()?))
        } else {
            self.power()?
        };
        self.leave(e)
    }

    fn power(&mut self) -> Option<Expr> {
        let mut base = self.primary()?;
        while self.eat(b'!') {
            base = Expr::Func(Func::Factorial, Box::new(base));
        }
        if !self.eat(b'^') {
            return Some(base);
        }
        let exponent = self.script()?;
        Some(Expr::Pow(Box::new(base), Box::new(exponent)))
    }

    /// A superscript: `{expr}`, one digit (LaTeX: `2^23` is 2^2·3), one letter, or a unary.
    fn script(&mut self) -> Option<Expr> {
        match self.peek()? {
            c if c.is_ascii_digit() => {
                self.pos += 1;
                Some(Expr::int(i128::from(c - b'0')))
            }
            c if c.is_ascii_alphabetic() => {
                self.pos += 1;
                Some(letter(c))
            }
            _ => self.unary(),
        }
    }

    /// A `\frac`/`\sqrt`/`\binom` argument: `{expr}` or one character/command (`\frac12`).
    fn argument(&mut self) -> Option<Expr> {
        match self.peek()? {
            b'{' => self.primary(),
            c if c.is_ascii_digit() => {
                self.pos += 1;
                Some(Expr::int(i128::from(c - b'0')))
            }
            c if c.is_ascii_alphabetic() => {
                self.pos += 1;
                Some(letter(c))
            }
            _ => self.primary(),
        }
    }

    /// A function's argument: `(expr)`, `{expr}`, or an implicit product `2x`, `\pi/6`-less.
    fn function_argument(&mut self) -> Option<Expr> {
        if matches!(self.peek()?, b'(' | b'{') {
            return self.power();
        }
        let mut acc = self.power()?;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric())
            || self
                .peek_command()
                .is_some_and(|n| n == "pi" || GREEK.contains(&n))
        {
            acc = Expr::Mul(Box::new(acc), Box::new(self.power()?));
        }
        Some(acc)
    }

    fn closed(&mut self, close: u8) -> Option<Expr> {
        let e = self.expr()?;
        self.eat(close).then_some(e)
    }

    fn primary(&mut self) -> Option<Expr> {
        self.enter()?;
        let e = match self.peek()? {
            b'(' => {
                self.pos += 1;
                self.closed(b')')?
            }
            b'{' => {
                self.pos += 1;
                self.closed(b'}')?
            }
            b'|' => {
                self.pos += 1;
                Expr::Func(Func::Abs, Box::new(self.closed(b'|')?))
            }
            c if c.is_ascii_digit() || c == b'.' => self.number()?,
            c if c.is_ascii_alphabetic() => self.letters()?,
            b'\\' => self.command()?,
            _ => return None,
        };
        self.leave(e)
    }

    fn command(&mut self) -> Option<Expr> {
        let name = self.peek_command()?.to_string();
        self.pos += 1 + name.len();
        let e = match name.as_str() {
            "frac" => {
                let num = self.argument()?;
                Expr::Div(Box::new(num), Box::new(self.argument()?))
            }
            "binom" | "dbinom" | "tbinom" => {
                let n = self.argument()?;
                Expr::Binom(Box::new(n), Box::new(self.argument()?))
            }
            "sqrt" => self.sqrt_rest()?,
            "pi" => Expr::Const(Constant::Pi),
            "infty" | "infinity" => Expr::Const(Constant::Infinity),
            "ln" => self.log_rest(Expr::Const(Constant::E))?,
            "log" => self.log_rest(Expr::int(10))?,
            "lfloor" => {
                let e = self.expr()?;
                self.eat_command("rfloor").then_some(())?;
                Expr::Func(Func::Floor, Box::new(e))
            }
            "lceil" => {
                let e = self.expr()?;
                self.eat_command("rceil").then_some(())?;
                Expr::Func(Func::Ceil, Box::new(e))
            }
            "vert" | "lvert" => {
                let e = self.expr()?;
                (self.eat_command("vert") || self.eat_command("rvert")).then_some(())?;
                Expr::Func(Func::Abs, Box::new(e))
            }
            name if GREEK.contains(&name) => self.subscripted(name.to_string())?,
            name => {
                let (_, f) = FUNCTIONS.iter().find(|(n, _)| *n == name)?;
                self.function_rest(*f)?
            }
        };
        Some(e)
    }

    /// After `\sqrt`: an optional `[n]` index then the radicand.
    fn sqrt_rest(&mut self) -> Option<Expr> {
        let n = if self.eat(b'[') {
            let start = self.pos;
            while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) {
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
        // `\sqrt17` is read as √17 (as models mean it), not LaTeX's √1·7.
        if self.peek().is_some_and(|c| c.is_ascii_digit()) {
            let start = self.pos;
            while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) {
                self.pos += 1;
            }
            let digits = std::str::from_utf8(self.s.get(start..self.pos)?).ok()?;
            return Some(Expr::Root(n, Box::new(Expr::Num(parse_decimal(digits)?))));
        }
        Some(Expr::Root(n, Box::new(self.argument()?)))
    }

    /// After `\log`/`\ln`: an optional `_base`, then the argument.
    fn log_rest(&mut self, default_base: Expr) -> Option<Expr> {
        let base = if self.eat(b'_') {
            self.argument()?
        } else {
            default_base
        };
        let arg = self.function_argument()?;
        Some(Expr::Log(Box::new(base), Box::new(arg)))
    }

    /// After a function name: an optional power (`\sin^2 x` = (sin x)^2) then the argument.
    fn function_rest(&mut self, f: Func) -> Option<Expr> {
        let power = if self.eat(b'^') {
            Some(self.script()?)
        } else {
            None
        };
        let applied = Expr::Func(f, Box::new(self.function_argument()?));
        Some(match power {
            // `\sin^{-1}` is the inverse function, as everywhere in trigonometry.
            Some(Expr::Neg(one)) if *one == Expr::int(1) => match applied {
                Expr::Func(Func::Sin, a) => Expr::Func(Func::Asin, a),
                Expr::Func(Func::Cos, a) => Expr::Func(Func::Acos, a),
                Expr::Func(Func::Tan, a) => Expr::Func(Func::Atan, a),
                other => Expr::Pow(Box::new(other), Box::new(Expr::int(-1))),
            },
            Some(p) => Expr::Pow(Box::new(applied), Box::new(p)),
            None => applied,
        })
    }

    /// A variable name with an optional subscript: `x_1`, `a_{10}`, `\theta_0`.
    fn subscripted(&mut self, name: String) -> Option<Expr> {
        if self.s.get(self.pos) != Some(&b'_') {
            return Some(Expr::Var(name));
        }
        self.pos += 1;
        let start = self.pos;
        if self.s.get(self.pos) == Some(&b'{') {
            let close = super::extract::matching_brace(self.s, self.pos)?;
            self.pos = close + 1;
        } else {
            self.pos += 1;
        }
        let sub = std::str::from_utf8(self.s.get(start..self.pos)?).ok()?;
        let sub = sub.trim_start_matches('{').trim_end_matches('}');
        Some(Expr::Var(format!("{name}_{sub}")))
    }

    /// One letter (a variable, or `e`), or a known plain function name; other runs of three
    /// or more letters are words and fail the parse.
    fn letters(&mut self) -> Option<Expr> {
        for (name, f) in FUNCTIONS {
            if self.eat_word(name) {
                return self.function_rest(f);
            }
        }
        if self.eat_word("sqrt") {
            return self.sqrt_rest();
        }
        if self.eat_word("pi") {
            return Some(Expr::Const(Constant::Pi));
        }
        if self.eat_word("ln") {
            return self.log_rest(Expr::Const(Constant::E));
        }
        if self.eat_word("log") {
            return self.log_rest(Expr::int(10));
        }
        let run = self
            .s
            .get(self.pos..)?
            .iter()
            .take_while(|c| c.is_ascii_alphabetic())
            .count();
        if run >= 3 {
            return None;
        }
        let c = *self.s.get(self.pos)?;
        self.pos += 1;
        match letter(c) {
            Expr::Var(name) => self.subscripted(name),
            other => Some(other),
        }
    }

    /// A decimal literal (`1.5`, `.5`, `2e-3`); an integer followed by a digit-only `\frac`
    /// is a mixed number (`1\frac{4}{5}` = 9/5).
    fn number(&mut self) -> Option<Expr> {
        let start = self.pos;
        while self
            .s
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
        {
            self.pos += 1;
        }
        let literal = std::str::from_utf8(self.s.get(start..self.pos)?).ok()?;
        let mut value = parse_decimal(literal)?;
        if literal.contains('.') && self.eat_command("overline") {
            value = value.add(self.repeating_part(literal)?)?;
        }
        if let Some(exp) = self.scientific_exponent() {
            value = value.mul(Value::Exact(super::numeric::Ratio::int(10)).pow(exp)?)?;
        } else if !literal.contains('.') {
            let save = self.pos;
            if let Some(frac) = self.digit_only_frac() {
                return Some(Expr::Num(value.add(frac)?));
            }
            self.pos = save;
        }
        // `4210_5` is a number in base 5: not an expression.
        if self.s.get(self.pos) == Some(&b'_') {
            return None;
        }
        Some(Expr::Num(value))
    }

    /// The value of `\overline{d...}` after `literal`: `0.1\overline{6}` adds 6/90.
    fn repeating_part(&mut self, literal: &str) -> Option<Value> {
        let decimals = literal.split_once('.').map_or(0, |(_, f)| f.len());
        let braced = self.eat(b'{');
        let start = self.pos;
        while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) && (braced || self.pos == start)
        {
            self.pos += 1;
        }
        let digits = std::str::from_utf8(self.s.get(start..self.pos)?).ok()?;
        if digits.is_empty() || digits.len() > 12 || (braced && !self.eat(b'}')) {
            return None;
        }
        let repeat: i128 = digits.parse().ok()?;
        let period = 10i128.checked_pow(u32::try_from(digits.len()).ok()?)? - 1;
        let shift = 10i128.checked_pow(u32::try_from(decimals).ok()?)?;
        Some(Value::Exact(super::numeric::Ratio::new(
            repeat,
            period.checked_mul(shift)?,
        )?))
    }

    /// `e3`, `E-3`, `e+12` right after a literal's digits.
    fn scientific_exponent(&mut self) -> Option<Value> {
        let b = self.s;
        if !matches!(b.get(self.pos), Some(b'e' | b'E')) {
            return None;
        }
        let mut i = self.pos + 1;
        let negative = b.get(i) == Some(&b'-');
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) && i - start < 4 {
            i += 1;
        }
        if i == start || b.get(i).is_some_and(u8::is_ascii_alphanumeric) {
            return None;
        }
        let n: i128 = std::str::from_utf8(b.get(start..i)?).ok()?.parse().ok()?;
        self.pos = i;
        Some(Value::Exact(super::numeric::Ratio::int(if negative {
            -n
        } else {
            n
        })))
    }

    fn digit_only_frac(&mut self) -> Option<Value> {
        if !self.eat_command("frac") {
            return None;
        }
        let num = self.digit_group()?;
        let den = self.digit_group()?;
        num.div(den)
    }

    /// `{123}` or a single digit, as an exact integer.
    fn digit_group(&mut self) -> Option<Value> {
        let braced = self.eat(b'{');
        let start = self.pos;
        while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) && (braced || self.pos == start)
        {
            self.pos += 1;
        }
        let digits = std::str::from_utf8(self.s.get(start..self.pos)?).ok()?;
        if digits.is_empty() || (braced && !self.eat(b'}')) {
            return None;
        }
        parse_decimal(digits)
    }
}

/// A single letter: `e` is Euler's number, anything else a variable.
fn letter(c: u8) -> Expr {
    if c == b'e' {
        Expr::Const(Constant::E)
    } else {
        Expr::Var(char::from(c).to_string())
    }
}

/// Relation commands that end an expression.
pub fn is_relation_command(name: &str) -> bool {
    matches!(
        name,
        "le" | "leq"
            | "leqslant"
            | "ge"
            | "geq"
            | "geqslant"
            | "lt"
            | "gt"
            | "ne"
            | "neq"
            | "in"
            | "cup"
            | "cap"
            | "to"
    )
}

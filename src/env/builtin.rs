//! The built-in environments: `guess`, `countdown`, `calculator-arithmetic` and `bandit`
//! (docs/environments.md). Each is a pure function of its seed and the model's messages.
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::rational::{self, Rational};
use super::tools::{Calculator, Tool, Toolbox};
use super::{CountdownPrompt, EnvConfig, EnvKind, Environment, Message, Reset, StepResult};
use crate::error::Result;

/// The built-in environment `kind` (not `program`).
pub fn make(
    kind: EnvKind,
    cfg: &EnvConfig,
    user_tools: Vec<Box<dyn Tool>>,
) -> Box<dyn Environment> {
    match kind {
        EnvKind::Countdown => Box::new(
            Countdown::new(
                cfg.countdown_numbers,
                i128::from(cfg.countdown_max_number),
                i128::from(cfg.countdown_max_target),
            )
            .with_prompt(cfg.countdown_prompt),
        ),
        EnvKind::CalculatorArithmetic => {
            let mut tools: Vec<Box<dyn Tool>> = vec![Box::new(Calculator)];
            tools.extend(user_tools);
            let prompt = cfg
                .calculator_prompt
                .as_deref()
                .unwrap_or(CALCULATOR_PROMPT);
            Box::new(CalculatorArithmetic::new(cfg.digits, Toolbox::new(tools)).with_prompt(prompt))
        }
        EnvKind::Bandit => Box::new(Bandit::new(
            cfg.bandit_arm_durations_s
                .iter()
                .copied()
                .zip(cfg.bandit_arm_payoffs.iter().copied())
                .collect(),
            cfg.bandit_budget_s,
        )),
        EnvKind::Guess | EnvKind::Program => {
            Box::new(Guess::new(cfg.guess_max, cfg.guess_valid_reward))
        }
    }
}

fn user(content: String) -> Message {
    Message {
        role: "user".into(),
        content,
    }
}

/// The first whole number in `text` (optionally negative), if any.
pub fn first_integer(text: &str) -> Option<i128> {
    integers(text).into_iter().next()
}

/// The last whole number in `text`.
pub fn last_integer(text: &str) -> Option<i128> {
    integers(text).pop()
}

fn integers(text: &str) -> Vec<i128> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let neg = i > 0 && b[i - 1] == b'-';
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b',') {
                i += 1;
            }
            let digits: String = text[start..i].chars().filter(|c| *c != ',').collect();
            if let Ok(v) = digits.parse::<i128>() {
                out.push(if neg { -v } else { v });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Number guessing: a secret in 1..=max; each guess is answered "higher", "lower" or
/// "correct". Reward 1 when found, `valid_reward` for a wrong guess inside 1..=max (a
/// per-turn format reward), 0 otherwise; info `valid` says whether the guess was in range.
pub struct Guess {
    max: u64,
    valid_reward: f64,
    secret: u64,
}

impl Guess {
    pub fn new(max: u64, valid_reward: f64) -> Self {
        Guess {
            max,
            valid_reward,
            secret: 1,
        }
    }
}

impl Environment for Guess {
    fn reset(&mut self, seed: u64) -> Result<Reset> {
        self.secret = ChaCha8Rng::seed_from_u64(seed).gen_range(1..=self.max);
        Ok(Reset {
            messages: vec![user(format!(
                "guess my number from 1 to {}. reply with a number.",
                self.max
            ))],
            tools: vec![],
            hidden: Some(format!("secret {}", self.secret)),
        })
    }

    fn step(&mut self, message: &str, _deadline: Instant) -> Result<StepResult> {
        let guess = first_integer(message);
        let (reply, done) = match guess {
            None => ("reply with a number.", false),
            Some(g) if g == self.secret as i128 => ("correct", true),
            Some(g) if g < self.secret as i128 => ("higher", false),
            Some(_) => ("lower", false),
        };
        let valid = guess.is_some_and(|g| (1..=self.max as i128).contains(&g));
        let reward = match (done, valid) {
            (true, _) => 1.0,
            (false, true) => self.valid_reward,
            (false, false) => 0.0,
        };
        Ok(StepResult {
            messages: if done {
                vec![]
            } else {
                vec![user(reply.into())]
            },
            reward,
            done,
            info: json!({"success": done, "reply": reply, "valid": valid}),
        })
    }
}

/// Countdown: make `target` from `numbers` with + − × ÷ and parentheses, each number at most
/// once. One turn; checked by exact evaluation, so every correct expression counts.
pub struct Countdown {
    pub numbers: Vec<i128>,
    pub target: i128,
    /// How the generator made the target from the numbers (the reference play).
    pub solution: String,
    /// Numbers per puzzle, the largest number of the pool, the largest target.
    count: usize,
    max_number: i128,
    max_target: i128,
    prompt: CountdownPrompt,
}

impl Default for Countdown {
    /// The classic puzzle: 4 numbers from the whole pool, targets 10..=999.
    fn default() -> Self {
        Countdown::new(4, 100, 999)
    }
}

const COUNTDOWN_POOL: [i128; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 25, 50, 75, 100];

/// Precedence of an expression's outermost operator: 1 for + and −, 2 for × and ÷ or a
/// single number.
fn precedence(op: char) -> u8 {
    match op {
        '+' | '-' => 1,
        _ => 2,
    }
}

/// A random expression over 2 or more of `numbers` (at least 2 of them), made left to right in a
/// shuffled order with random operators: its exact value (0 after an overflow or a division
/// by zero) and its text, parenthesised only where a tighter operator follows.
pub fn random_expression<R: Rng>(numbers: &[i128], rng: &mut R) -> (Rational, String) {
    let mut order = numbers.to_vec();
    order.shuffle(rng);
    let k = rng.gen_range(2..=order.len());
    let mut acc = Rational::integer(order[0]);
    let mut text = order[0].to_string();
    // The outermost operator of `text` (a lone number binds like × and ÷).
    let mut outer = '*';
    for &n in &order[1..k] {
        let r = Rational::integer(n);
        let (op, next) = match rng.gen_range(0..4) {
            0 => ('+', acc.checked_add(r)),
            1 => ('-', acc.checked_sub(r)),
            2 => ('*', acc.checked_mul(r)),
            _ => ('/', acc.checked_div(r)),
        };
        acc = next.unwrap_or(Rational::integer(0));
        // Left to right: the left side needs parentheses only under a tighter operator.
        if precedence(op) > precedence(outer) {
            text = format!("({text})");
        }
        text = format!("{text}{op}{n}");
        outer = op;
    }
    (acc, text)
}

impl Countdown {
    pub fn new(count: usize, max_number: i128, max_target: i128) -> Self {
        Countdown {
            numbers: vec![],
            target: 0,
            solution: String::new(),
            count,
            max_number,
            max_target,
            prompt: CountdownPrompt::Full,
        }
    }

    /// The same puzzles asked with `prompt`.
    pub fn with_prompt(self, prompt: CountdownPrompt) -> Self {
        Countdown { prompt, ..self }
    }

    /// The numbers puzzles draw from: 1..=10, 25, 50, 75, 100 up to `max_number`.
    pub fn number_pool(&self) -> Vec<i128> {
        COUNTDOWN_POOL
            .iter()
            .copied()
            .filter(|&n| n <= self.max_number)
            .collect()
    }

    /// Numbers per puzzle and the largest target.
    pub fn shape(&self) -> (usize, i128) {
        (self.count, self.max_target)
    }

    /// Draws `count` numbers from the pool (those up to `max_number`) and a reachable target
    /// (10..=max_target) made left to right from 2 to `count` of them; returns the numbers,
    /// the target and the expression that makes it.
    pub fn draw(&self, seed: u64) -> (Vec<i128>, i128, String) {
        let pool = self.number_pool();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        loop {
            let numbers: Vec<i128> = (0..self.count)
                .map(|_| *pool.choose(&mut rng).expect("non-empty pool"))
                .collect();
            let (value, text) = random_expression(&numbers, &mut rng);
            if value.denom() == 1 && (10..=self.max_target).contains(&value.numer()) {
                return (numbers, value.numer(), text);
            }
        }
    }

    /// Whether `expression` reaches the target with the allowed numbers, or why not.
    pub fn check(&self, expression: &str) -> std::result::Result<(), String> {
        let e = rational::parse(expression)?;
        if e.has_negation() {
            return Err("unary minus is not allowed".into());
        }
        let mut left = self.numbers.clone();
        for lit in e.literals() {
            let v: Option<i128> = lit.parse().ok();
            match v.and_then(|v| left.iter().position(|&n| n == v)) {
                Some(i) => {
                    left.swap_remove(i);
                }
                None => return Err(format!("{lit} is not one of the numbers left to use")),
            }
        }
        let v = e.eval()?;
        if v == Rational::integer(self.target) {
            Ok(())
        } else {
            Err(format!("the expression makes {v}, not {}", self.target))
        }
    }
}

/// The expression a countdown answer gives: inside `<answer>...</answer>` when present,
/// else the last non-empty line, without a trailing `= result`.
pub fn countdown_expression(message: &str) -> &str {
    let inner = match (message.find("<answer>"), message.find("</answer>")) {
        (Some(a), Some(b)) if a + 8 <= b => &message[a + 8..b],
        _ => message
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(""),
    };
    inner.split('=').next().unwrap_or("").trim()
}

impl Countdown {
    /// The first message of the puzzle in `numbers` and `target`.
    fn ask(&self) -> Reset {
        let list: Vec<String> = self.numbers.iter().map(|n| n.to_string()).collect();
        let text = match self.prompt {
            CountdownPrompt::Full => format!(
                "use the numbers {} to make {} with + - * / and parentheses, each number at \
                 most once. reply with the expression only.",
                list.join(", "),
                self.target
            ),
            CountdownPrompt::Short => format!("make {} from {}", self.target, list.join(" ")),
        };
        Reset {
            messages: vec![user(text)],
            tools: vec![],
            hidden: Some(format!("solution {}", self.solution)),
        }
    }
}

impl Environment for Countdown {
    fn reset(&mut self, seed: u64) -> Result<Reset> {
        (self.numbers, self.target, self.solution) = self.draw(seed);
        Ok(self.ask())
    }

    /// A given puzzle (eva's evolved ones, `env::countdown_eva`): the row's `numbers`,
    /// `target` and `solution` (its reference play); the seed is not used.
    fn reset_row(&mut self, _seed: u64, row: &serde_json::Value) -> Result<Reset> {
        let p = super::countdown_eva::Puzzle::from_row(row)
            .map_err(|m| crate::error::Error::config("countdown puzzle", m))?;
        (self.numbers, self.target, self.solution) = (p.numbers, p.target, p.solution);
        Ok(self.ask())
    }

    fn step(&mut self, message: &str, _deadline: Instant) -> Result<StepResult> {
        let verdict = self.check(countdown_expression(message));
        Ok(StepResult {
            messages: vec![],
            reward: if verdict.is_ok() { 1.0 } else { 0.0 },
            done: true,
            info: json!({"success": verdict.is_ok(), "reason": verdict.err(), "target": self.target}),
        })
    }

    /// The expression the generator made the target with.
    fn demonstration(&self) -> Option<Vec<String>> {
        Some(vec![self.solution.clone()])
    }
}

/// Where `env.calculator_prompt` puts the expression.
pub const QUESTION: &str = "{question}";

/// The default `calculator-arithmetic` question.
pub const CALCULATOR_PROMPT: &str =
    "what is {question}? call the calculator tool, then reply with the number only.";

/// Arithmetic on large numbers; success needs the right number and at least one successful
/// calculator call.
pub struct CalculatorArithmetic {
    digits: u32,
    tools: Toolbox,
    /// The question's wording, [`QUESTION`] standing for the expression.
    prompt: String,
    /// The question's expression, e.g. `1234 * 5678`.
    question: String,
    answer: i128,
    calls_ok: usize,
}

impl CalculatorArithmetic {
    pub fn new(digits: u32, tools: Toolbox) -> Self {
        CalculatorArithmetic {
            digits,
            tools,
            prompt: CALCULATOR_PROMPT.into(),
            question: String::new(),
            answer: 0,
            calls_ok: 0,
        }
    }

    /// Asks with `prompt` ([`QUESTION`] replaced by the expression) instead of the default.
    pub fn with_prompt(mut self, prompt: &str) -> Self {
        self.prompt = prompt.into();
        self
    }
}

impl Environment for CalculatorArithmetic {
    fn reset(&mut self, seed: u64) -> Result<Reset> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let lo = 10i128.pow(self.digits - 1);
        let (a, b) = (rng.gen_range(lo..lo * 10), rng.gen_range(lo..lo * 10));
        let (op, answer) = match rng.gen_range(0..3) {
            0 => ('+', a + b),
            1 => ('-', a - b),
            _ => ('*', a * b),
        };
        self.answer = answer;
        self.question = format!("{a} {op} {b}");
        self.calls_ok = 0;
        Ok(Reset {
            messages: vec![user(self.prompt.replace(QUESTION, &self.question))],
            tools: self.tools.schemas(),
            hidden: Some(format!("result {answer}")),
        })
    }

    fn step(&mut self, message: &str, deadline: Instant) -> Result<StepResult> {
        let (tool_msgs, ok) = self.tools.run(message, deadline);
        self.calls_ok += ok;
        if !tool_msgs.is_empty() {
            return Ok(StepResult {
                info: json!({"tool_calls": tool_msgs.len(), "tool_calls_ok": ok}),
                messages: tool_msgs,
                reward: 0.0,
                done: false,
            });
        }
        let right = last_integer(message) == Some(self.answer);
        let success = right && self.calls_ok > 0;
        Ok(StepResult {
            messages: vec![],
            reward: if success { 1.0 } else { 0.0 },
            done: true,
            info: json!({"success": success, "answer_right": right, "used_calculator": self.calls_ok > 0}),
        })
    }

    /// Calls the calculator with the question (compact JSON, the shortest call), then replies
    /// with the number.
    fn demonstration(&self) -> Option<Vec<String>> {
        let call = json!({"name": "calculator", "arguments": {"expression": self.question}});
        Some(vec![
            format!("<tool_call>{call}</tool_call>"),
            self.answer.to_string(),
        ])
    }
}

/// A timed bandit: each arm takes its simulated seconds and pays its mean on average
/// (`env.bandit_arm_durations_s`, `env.bandit_arm_payoffs`; by default arm 1 takes 1 s and pays
/// 1, arm 2 takes 3 s and pays 4, more per pull and per second). Pulls go on until
/// `env.bandit_budget_s` simulated seconds are spent; each step's info records the arm and its
/// duration.
pub struct Bandit {
    /// (duration in simulated seconds, mean payout) of each arm, arm 1 first.
    arms: Vec<(f64, f64)>,
    budget_s: f64,
    rng: Option<ChaCha8Rng>,
    elapsed_s: f64,
}

/// The default arms' durations (simulated seconds) and mean payouts, and the budget.
pub const BANDIT_ARM_DURATIONS_S: [f64; 2] = [1.0, 3.0];
pub const BANDIT_ARM_PAYOFFS: [f64; 2] = [1.0, 4.0];
pub const BANDIT_BUDGET_S: f64 = 10.0;

impl Default for Bandit {
    fn default() -> Self {
        Bandit::new(
            BANDIT_ARM_DURATIONS_S
                .into_iter()
                .zip(BANDIT_ARM_PAYOFFS)
                .collect(),
            BANDIT_BUDGET_S,
        )
    }
}

impl Bandit {
    /// `arms`: (duration, mean payout) of each arm, arm 1 first (validated by `EnvConfig`).
    pub fn new(arms: Vec<(f64, f64)>, budget_s: f64) -> Self {
        Bandit {
            arms,
            budget_s,
            rng: None,
            elapsed_s: 0.0,
        }
    }

    /// "reply 1 or 2." / "reply 1, 2 or 3."
    fn reply_hint(&self) -> String {
        let n = self.arms.len();
        let first: Vec<String> = (1..n).map(|a| a.to_string()).collect();
        format!("reply {} or {n}.", first.join(", "))
    }
}

impl Environment for Bandit {
    fn reset(&mut self, seed: u64) -> Result<Reset> {
        self.rng = Some(ChaCha8Rng::seed_from_u64(seed));
        self.elapsed_s = 0.0;
        let arms: Vec<String> = self
            .arms
            .iter()
            .enumerate()
            .map(|(i, (d, _))| format!("arm {} takes {d}s", i + 1))
            .collect();
        Ok(Reset {
            messages: vec![user(format!(
                "{}. time left {}s. {}",
                arms.join(", "),
                self.budget_s,
                self.reply_hint()
            ))],
            tools: vec![],
            hidden: Some(
                self.arms
                    .iter()
                    .enumerate()
                    .map(|(i, (_, pays))| match i {
                        0 => format!("arm 1 pays {pays} on average"),
                        _ => format!("arm {} pays {pays}", i + 1),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        })
    }

    fn step(&mut self, message: &str, _deadline: Instant) -> Result<StepResult> {
        let n = self.arms.len() as i128;
        let arm = first_integer(message).filter(|a| (1..=n).contains(a));
        let Some(arm) = arm else {
            return Ok(StepResult {
                messages: vec![user(self.reply_hint())],
                reward: 0.0,
                done: false,
                // No action ran: its duration is unknown (duration-aware updates give it the
                // fixed `advantage.duration.unparsable`).
                info: json!({"arm": null, "duration_s": null, "elapsed_s": self.elapsed_s}),
            });
        };
        let (duration, mean) = self.arms[arm as usize - 1];
        let u: f64 = self
            .rng
            .get_or_insert_with(|| ChaCha8Rng::seed_from_u64(0))
            .gen();
        let payout = mean * (0.5 + u);
        self.elapsed_s += duration;
        let left = self.budget_s - self.elapsed_s;
        let done = left <= 0.0;
        Ok(StepResult {
            messages: if done {
                vec![]
            } else {
                vec![user(format!("paid {payout:.1}. time left {left}s."))]
            },
            reward: payout,
            done,
            info: json!({"arm": arm, "duration_s": duration, "elapsed_s": self.elapsed_s}),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn guess_answers_higher_lower_and_correct() {
        let mut g = Guess::new(16, 0.25);
        let r = g.reset(5).unwrap();
        assert_eq!(
            r.messages[0].content,
            "guess my number from 1 to 16. reply with a number."
        );
        let secret = g.secret;
        assert!((1..=16).contains(&secret));
        // The same seed gives the same secret.
        g.reset(5).unwrap();
        assert_eq!(g.secret, secret);
        let s = g.step("no idea", soon()).unwrap();
        assert_eq!(
            (s.messages[0].content.as_str(), s.done),
            ("reply with a number.", false)
        );
        assert_eq!((s.reward, s.info["valid"].clone()), (0.0, json!(false)));
        if secret > 1 {
            let s = g.step(&format!("{}", secret - 1), soon()).unwrap();
            assert_eq!(s.messages[0].content, "higher");
            // A wrong guess in range earns the format reward.
            assert_eq!((s.reward, s.info["valid"].clone()), (0.25, json!(true)));
        }
        // Out of range: "lower", but no format reward.
        let s = g.step("17", soon()).unwrap();
        assert_eq!((s.messages[0].content.as_str(), s.reward), ("lower", 0.0));
        if secret < 16 {
            let s = g.step(&format!("maybe {}?", secret + 1), soon()).unwrap();
            assert_eq!(s.messages[0].content, "lower");
        }
        let s = g.step(&secret.to_string(), soon()).unwrap();
        assert_eq!(
            (s.reward, s.done, s.info["success"].clone()),
            (1.0, true, json!(true))
        );
    }

    #[test]
    fn countdown_accepts_every_correct_expression_and_names_mistakes() {
        let c = Countdown {
            numbers: vec![25, 4, 7, 3],
            target: 103,
            ..Countdown::default()
        };
        // 25*4 + 3 = 103; (7-3)*25 + 4 - 1 is not allowed (1 is not given); 4*25+3 again.
        assert_eq!(c.check("25*4 + 3"), Ok(()));
        assert_eq!(c.check("3 + 4 * 25"), Ok(()));
        // (25 + 7) * 3 + 4 + ... : 32*3 = 96, + 7 would reuse 7.
        assert_eq!(
            c.check("(25 + 7) * 3 + 7"),
            Err("7 is not one of the numbers left to use".into())
        );
        assert_eq!(
            c.check("25 * 4"),
            Err("the expression makes 100, not 103".into())
        );
        assert_eq!(
            c.check("-3 + 106"),
            Err("unary minus is not allowed".into())
        );
        // (7 - 3/3)... 3 is given once: 3/3 reuses it.
        assert!(c.check("7 - 3/3").is_err());
        // Division stays exact: (25 - 7/7)... not available; 100/(4/4) reuses 4.
        assert_eq!(
            countdown_expression("I think:\n<answer>25*4+3</answer>"),
            "25*4+3"
        );
        assert_eq!(countdown_expression("steps...\n25*4+3 = 103\n"), "25*4+3");
        // Drawn puzzles are reachable: the generator's own target is made from the numbers.
        for seed in 0..50 {
            let (numbers, target, _) = Countdown::default().draw(seed);
            assert_eq!(numbers.len(), 4);
            assert!((10..=999).contains(&target), "{target}");
        }
        let twice = Countdown {
            numbers: vec![4, 4, 7, 3],
            target: 12,
            ..Countdown::default()
        };
        assert_eq!(twice.check("7 / (4 - 4)"), Err("division by zero".into()));
        assert_eq!(
            twice.check("(4 + 4) * 3 / 2"),
            Err("2 is not one of the numbers left to use".into())
        );
        // 4*3 = 12, and (7 - 4 + 3) * ... : exact fractions count, 4 / (7 - 4 - 3 + 1/... no.
        assert_eq!(twice.check("4 * 3"), Ok(()));
        assert_eq!(twice.check("(7 + 4 + 4) - 3"), Ok(()));
        let mut env = Countdown::default();
        env.reset(1).unwrap();
        let s = env.step("no idea", soon()).unwrap();
        assert!(s.done && s.reward == 0.0);
        assert!(
            s.info["reason"]
                .as_str()
                .unwrap()
                .starts_with("at character 1"),
            "{}",
            s.info
        );
    }

    /// The reference play is the generator's own expression: parenthesised where a tighter
    /// operator follows, and it solves its puzzle (checked by the environment itself).
    #[test]
    fn countdown_demonstrates_the_expression_that_made_the_target() {
        assert_eq!((precedence('+'), precedence('-')), (1, 1));
        assert_eq!((precedence('*'), precedence('/')), (2, 2));
        let small = Countdown::new(3, 9, 30);
        for seed in 0..200 {
            let mut env = Countdown::new(3, 9, 30);
            let r = env.reset(seed).unwrap();
            assert_eq!(env.numbers.len(), 3);
            assert!(
                env.numbers.iter().all(|n| (1..=9).contains(n)),
                "{:?}",
                env.numbers
            );
            assert!((10..=30).contains(&env.target), "{}", env.target);
            assert!(r.messages[0]
                .content
                .contains(&format!("make {} ", env.target)));
            let demo = env.demonstration().unwrap();
            assert_eq!(demo.len(), 1);
            let s = env.step(&demo[0], soon()).unwrap();
            assert_eq!(
                s.info["success"],
                json!(true),
                "seed {seed}: {} {:?}",
                demo[0],
                s.info
            );
            assert_eq!(small.draw(seed).2, demo[0]);
        }
        // Hand-made: 2+3 then ×4 needs parentheses, 2×3 then +4 does not.
        let mut c = Countdown::new(3, 9, 30);
        let mut found = (false, false);
        for seed in 0..400 {
            c.reset(seed).unwrap();
            found.0 |= c.solution.starts_with('(');
            found.1 |=
                c.solution.contains('*') && c.solution.contains('+') && !c.solution.contains('(');
        }
        assert!(found.0 && found.1, "{found:?}");
        // The short prompt asks the same puzzle in a few tokens.
        let mut short = Countdown::new(3, 9, 30).with_prompt(CountdownPrompt::Short);
        let r = short.reset(7).unwrap();
        let mut full = Countdown::new(3, 9, 30);
        full.reset(7).unwrap();
        let list: Vec<String> = full.numbers.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            r.messages[0].content,
            format!("make {} from {}", full.target, list.join(" "))
        );
        // Defaults: the classic puzzle (the whole pool, 4 numbers, the same draws as before).
        let (numbers, target, _) = Countdown::default().draw(1);
        assert_eq!(numbers.len(), 4);
        assert!((10..=999).contains(&target));
    }

    #[test]
    fn calculator_arithmetic_needs_a_successful_calculator_call() {
        let mut env = CalculatorArithmetic::new(3, Toolbox::new(vec![Box::new(Calculator)]));
        let r = env.reset(2).unwrap();
        assert_eq!(r.tools[0]["function"]["name"], "calculator");
        let q = &r.messages[0].content;
        // "what is A op B? ..." → compute it by hand from the text.
        let expr = q.trim_start_matches("what is ").split('?').next().unwrap();
        let answer = rational::evaluate(expr).unwrap().to_string();
        // Right answer without a call: not a success.
        let mut again = CalculatorArithmetic::new(3, Toolbox::new(vec![Box::new(Calculator)]));
        again.reset(2).unwrap();
        let s = again.step(&answer, soon()).unwrap();
        assert_eq!(
            (s.reward, s.info["answer_right"].clone()),
            (0.0, json!(true))
        );
        let call = format!(
            "<tool_call>{{\"name\": \"calculator\", \"arguments\": {{\"expression\": \"{expr}\"}}}}</tool_call>"
        );
        let s = env.step(&call, soon()).unwrap();
        assert_eq!(s.messages[0].role, "tool");
        assert_eq!(s.messages[0].content, answer);
        assert!(!s.done);
        let s = env
            .step(&format!("the answer is {answer}"), soon())
            .unwrap();
        assert_eq!((s.reward, s.done), (1.0, true));
        assert_eq!(last_integer("it is 1,234 or -56"), Some(-56));
        assert_eq!(first_integer("it is 1,234 or -56"), Some(1234));
    }

    /// The reference play solves the episode: the call carries the question's expression and
    /// the reply the calculator's result. Only the kinds that say so demonstrate.
    #[test]
    fn calculator_arithmetic_demonstrates_a_solved_episode() {
        let mut env = CalculatorArithmetic::new(4, Toolbox::new(vec![Box::new(Calculator)]));
        for seed in 0..20 {
            let r = env.reset(seed).unwrap();
            let expr = r.messages[0]
                .content
                .trim_start_matches("what is ")
                .split('?')
                .next()
                .unwrap()
                .to_string();
            let demo = env.demonstration().unwrap();
            assert_eq!(
                demo[0],
                format!(
                    "<tool_call>{{\"arguments\":{{\"expression\":\"{expr}\"}},\"name\":\"calculator\"}}</tool_call>"
                )
            );
            let s = env.step(&demo[0], soon()).unwrap();
            assert_eq!(s.messages[0].content, demo[1]);
            let s = env.step(&demo[1], soon()).unwrap();
            assert!(s.done && s.info["success"] == json!(true), "{:?}", s.info);
        }
        let cfg = EnvConfig::default();
        for kind in [
            EnvKind::Guess,
            EnvKind::Countdown,
            EnvKind::CalculatorArithmetic,
            EnvKind::Bandit,
        ] {
            let mut e = make(kind, &cfg, vec![]);
            e.reset(1).unwrap();
            assert_eq!(e.demonstration().is_some(), kind.demonstrates(), "{kind:?}");
        }
    }

    /// `env.calculator_prompt` rewords the question around the same expression; the episode
    /// (answer, reference play, the calculator rule) is the seed's as before.
    #[test]
    fn calculator_prompt_rewords_the_question_only() {
        let cfg = EnvConfig {
            kind: EnvKind::CalculatorArithmetic,
            digits: 3,
            calculator_prompt: Some("{question}=? use the calculator".into()),
            ..Default::default()
        };
        let mut terse = make(EnvKind::CalculatorArithmetic, &cfg, vec![]);
        let mut wordy = make(
            EnvKind::CalculatorArithmetic,
            &EnvConfig {
                calculator_prompt: None,
                ..cfg.clone()
            },
            vec![],
        );
        for seed in 0..10 {
            let (t, w) = (terse.reset(seed).unwrap(), wordy.reset(seed).unwrap());
            let expr = w.messages[0].content["what is ".len()..]
                .split('?')
                .next()
                .unwrap()
                .to_string();
            assert_eq!(
                t.messages[0].content,
                format!("{expr}=? use the calculator")
            );
            assert_eq!(t.tools, w.tools);
            assert_eq!(terse.demonstration(), wordy.demonstration());
            // Still no success without a calculator call.
            let answer = terse.demonstration().unwrap()[1].clone();
            let s = terse.step(&answer, soon()).unwrap();
            assert_eq!(
                (s.reward, s.info["answer_right"].clone()),
                (0.0, json!(true))
            );
        }
    }

    #[test]
    fn bandit_records_durations_and_pays_more_on_the_slow_arm() {
        let mut b = Bandit::default();
        b.reset(9).unwrap();
        let s = b.step("2", soon()).unwrap();
        assert_eq!(
            (s.info["arm"].clone(), s.info["duration_s"].clone()),
            (json!(2), json!(3.0))
        );
        // Payout = mean × (0.5 + u): within [2, 6) for arm 2.
        assert!((2.0..6.0).contains(&s.reward));
        // 3 + 3 + 3 = 9 s; the fourth pull of arm 1 reaches 10 s and ends the episode.
        b.step("2", soon()).unwrap();
        b.step("2", soon()).unwrap();
        let s = b.step("1", soon()).unwrap();
        assert_eq!((s.done, s.info["elapsed_s"].clone()), (true, json!(10.0)));
        assert!((0.5..1.5).contains(&s.reward));
        let mut b = Bandit::default();
        let r = b.reset(9).unwrap();
        assert_eq!(
            r.messages[0].content,
            "arm 1 takes 1s, arm 2 takes 3s. time left 10s. reply 1 or 2."
        );
        let s = b.step("3", soon()).unwrap();
        assert!(!s.done);
        assert_eq!(s.messages[0].content, "reply 1 or 2.");
        assert_eq!(s.info["duration_s"], serde_json::Value::Null);
    }

    /// Each built-in environment exposes at reset what the policy's prompt hides (for an
    /// asymmetric critic): guess's secret, countdown's generated solution, calculator's
    /// result (checked against an independent evaluation of the question), bandit's payouts.
    #[test]
    fn every_builtin_exposes_the_state_its_prompt_hides() {
        for seed in 0..20 {
            let mut g = Guess::new(16, 0.0);
            let r = g.reset(seed).unwrap();
            let hidden = r.hidden.unwrap();
            assert_eq!(hidden, format!("secret {}", g.secret));
            assert!(!r.messages[0].content.contains(&hidden));

            let mut c = Countdown::new(3, 9, 30);
            let r = c.reset(seed).unwrap();
            let solution = c.demonstration().unwrap().remove(0);
            assert_eq!(r.hidden.unwrap(), format!("solution {solution}"));
            assert!(c.step(&solution, soon()).unwrap().info["success"] == json!(true));

            let tools = Toolbox::new(vec![Box::new(Calculator)]);
            let mut a = CalculatorArithmetic::new(3, tools).with_prompt("{question}=?");
            let r = a.reset(seed).unwrap();
            let q = r.messages[0].content.trim_end_matches("=?").to_string();
            let result = rational::evaluate(&q).unwrap().to_string();
            assert_eq!(r.hidden.unwrap(), format!("result {result}"));
        }
        let r = Bandit::default().reset(0).unwrap();
        assert_eq!(
            r.hidden.as_deref(),
            Some("arm 1 pays 1 on average, arm 2 pays 4")
        );
    }

    /// `env.bandit_*` set the arms and the budget; the prompt lists them; the payout of a pull
    /// is the arm's mean × (0.5 + u) with the same u as the default bandit's first pull.
    #[test]
    fn bandit_arms_follow_the_config() {
        let cfg = EnvConfig {
            kind: EnvKind::Bandit,
            bandit_arm_durations_s: vec![1.0, 3.0, 0.5],
            bandit_arm_payoffs: vec![1.0, 2.0, 0.25],
            bandit_budget_s: 4.0,
            ..Default::default()
        };
        assert_eq!(cfg.validate(), Ok(()));
        let mut b = make(EnvKind::Bandit, &cfg, vec![]);
        let r = b.reset(9).unwrap();
        assert_eq!(
            r.messages[0].content,
            "arm 1 takes 1s, arm 2 takes 3s, arm 3 takes 0.5s. time left 4s. reply 1, 2 or 3."
        );
        assert_eq!(
            r.hidden.as_deref(),
            Some("arm 1 pays 1 on average, arm 2 pays 2, arm 3 pays 0.25")
        );
        let mut default = Bandit::default();
        default.reset(9).unwrap();
        // arm 1 pays mean 1 in both: the same u, so the same payout.
        let u_payout = default.step("1", soon()).unwrap().reward;
        let s = b.step("2", soon()).unwrap();
        assert!((s.reward - 2.0 * u_payout).abs() < 1e-12, "{}", s.reward);
        assert_eq!(
            (s.info["arm"].clone(), s.info["duration_s"].clone(), s.done),
            (json!(2), json!(3.0), false)
        );
        assert_eq!(
            s.messages[0].content,
            format!("paid {:.1}. time left 1s.", s.reward)
        );
        // 3 + 0.5 + 0.5 = 4 s: the budget is spent.
        assert!(!b.step("3", soon()).unwrap().done);
        let s = b.step("3", soon()).unwrap();
        assert_eq!((s.done, s.info["elapsed_s"].clone()), (true, json!(4.0)));
        b.reset(9).unwrap();
        let s = b.step("4", soon()).unwrap();
        assert_eq!(s.info["arm"], serde_json::Value::Null);
        assert_eq!(s.messages[0].content, "reply 1, 2 or 3.");
    }
}

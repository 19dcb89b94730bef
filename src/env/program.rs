//! Environments written as programs: the JSON-lines protocol of docs/environments.md.
//!
//! grove starts `env.pool` copies of `env.program` and spreads episodes over them; every
//! request names its episode, so one process may hold many episodes. Each request gets one
//! answer line:
//!
//! ```text
//! → {"op": "reset", "episode": 7, "seed": 42}          (with env.data: and "row": {...})
//! ← {"messages": [{"role": "user", "content": "..."}], "tools": []}
//! → {"op": "step", "episode": 7, "message": {"role": "assistant", "content": "..."}}
//! ← {"messages": [...], "reward": 0.0, "done": false, "info": {}}
//! → {"op": "close", "episode": 7}
//! ← {}
//! ```
//!
//! A crash, a hang (no line within `env.step_timeout_s`) or a line that is not JSON restarts
//! the process; the episodes it held end with the failure in their info and training goes
//! on. `env.max_consecutive_failures` failures in a row stop the run with an error naming the
//! program and the last failure.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{EnvConfig, Environment, Message, Reset, StepResult};
use crate::compute::process::{quote, LineProcess};
use crate::error::{Error, Result};

struct Slot {
    process: Option<LineProcess>,
    /// Bumped at every (re)start: an episode started on an older process has lost its state.
    generation: u64,
}

/// The processes of one environment program.
pub struct Pool {
    command: Vec<String>,
    timeout: Duration,
    max_failures: usize,
    slots: Vec<Mutex<Slot>>,
    consecutive_failures: AtomicUsize,
}

impl Pool {
    /// Processes start on first use.
    pub fn new(cfg: &EnvConfig) -> Self {
        Pool {
            command: cfg.program.clone(),
            timeout: Duration::from_secs_f64(cfg.step_timeout_s),
            max_failures: cfg.max_consecutive_failures,
            slots: (0..cfg.pool)
                .map(|_| {
                    Mutex::new(Slot {
                        process: None,
                        generation: 0,
                    })
                })
                .collect(),
            consecutive_failures: AtomicUsize::new(0),
        }
    }

    fn display(&self) -> String {
        self.command.join(" ")
    }

    /// Counts a failure: Ok(message) while under the limit, the run-stopping error at it.
    fn failure(&self, what: String) -> Result<String> {
        let n = self.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.max_failures {
            return Err(Error::Task(format!(
                "environment program `{}` failed {n} times in a row \
                 (env.max_consecutive_failures); last: {what}",
                self.display()
            )));
        }
        Ok(what)
    }

    /// One exchange on slot `slot`. `generation`: the process the episode lives on (None:
    /// any, for a reset). Inner Err: a failure the episode absorbs (already counted).
    fn request(
        &self,
        slot: usize,
        generation: Option<u64>,
        req: &Value,
        deadline: Instant,
    ) -> Result<std::result::Result<(Value, u64), String>> {
        let mut s = self.slots[slot]
            .lock()
            .map_err(|_| Error::Internal("environment pool lock poisoned".into()))?;
        if s.process.is_none() {
            if generation.is_some() {
                return Ok(Err(
                    "the program was restarted; this episode's state was lost".into(),
                ));
            }
            match LineProcess::spawn(&self.command) {
                Ok(p) => {
                    s.process = Some(p);
                    s.generation += 1;
                }
                Err(e) => return self.failure(format!("environment program {e}")).map(Err),
            }
        }
        if generation.is_some_and(|g| g != s.generation) {
            return Ok(Err(
                "the program was restarted; this episode's state was lost".into(),
            ));
        }
        let p = s.process.as_mut().expect("started above");
        let line = match p.exchange(req, deadline) {
            Ok(l) => l,
            Err(f) => {
                s.process = None;
                let op = req["op"].as_str().unwrap_or("?");
                return self
                    .failure(format!(
                        "environment program `{}` ({op}): {f}",
                        self.display()
                    ))
                    .map(Err);
            }
        };
        let v: Value = match serde_json::from_str(&line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                // Out of step with its requests from here on: restart.
                s.process = None;
                return self
                    .failure(format!(
                        "environment program `{}` printed {:?}, expected one JSON object per line",
                        self.display(),
                        quote(&line)
                    ))
                    .map(Err);
            }
        };
        if let Some(e) = v.get("error") {
            return self
                .failure(format!(
                    "environment program `{}` reported: {e}",
                    self.display()
                ))
                .map(Err);
        }
        // Only a working step or close clears the count: a program that answers resets but
        // fails every step still keeps failing.
        if req["op"] != "reset" {
            self.consecutive_failures.store(0, Ordering::SeqCst);
        }
        Ok(Ok((v, s.generation)))
    }
}

/// One episode of a program environment.
pub struct ProgramEnv {
    pool: Arc<Pool>,
    episode: u64,
    slot: usize,
    generation: Option<u64>,
}

impl ProgramEnv {
    pub fn new(pool: Arc<Pool>, episode: u64) -> Self {
        let slot = (episode % pool.slots.len() as u64) as usize;
        ProgramEnv {
            pool,
            episode,
            slot,
            generation: None,
        }
    }
}

fn messages(v: &Value, field: &str) -> std::result::Result<Vec<Message>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(m) => serde_json::from_value(m.clone()).map_err(|e| {
            format!("`{field}`: expected a list of {{\"role\", \"content\"}} messages ({e})")
        }),
    }
}

/// A step answer, or what is wrong with it.
fn parse_step(v: &Value) -> std::result::Result<StepResult, String> {
    let reward = v
        .get("reward")
        .and_then(Value::as_f64)
        .filter(|r| r.is_finite())
        .ok_or_else(|| format!("`reward`: expected a finite number, found {}", v["reward"]))?;
    let done = v
        .get("done")
        .and_then(Value::as_bool)
        .ok_or_else(|| format!("`done`: expected true or false, found {}", v["done"]))?;
    let msgs = messages(v, "messages")?;
    if !done && msgs.is_empty() {
        return Err("not done but no `messages` for the model's next turn".into());
    }
    Ok(StepResult {
        messages: msgs,
        reward,
        done,
        info: v.get("info").cloned().unwrap_or(json!({})),
    })
}

impl ProgramEnv {
    /// The reset request, with the dataset row's fields as `row` when there is one.
    fn reset_with(&mut self, seed: u64, row: Option<&Value>) -> Result<Reset> {
        let mut req = json!({"op": "reset", "episode": self.episode, "seed": seed});
        if let Some(row) = row {
            req["row"] = row.clone();
        }
        // A reset has no episode to end: retry on a fresh process until it works or the
        // failure limit stops the run.
        loop {
            let deadline = Instant::now() + self.pool.timeout;
            let Ok((v, generation)) = self.pool.request(self.slot, None, &req, deadline)? else {
                continue;
            };
            let tools = match v.get("tools") {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Array(t)) => Ok(t.clone()),
                Some(other) => Err(format!("`tools`: expected a list, found {other}")),
            };
            let hidden = match v.get("hidden") {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(h)) => Ok(Some(h.clone())),
                Some(other) => Err(format!("`hidden`: expected a string, found {other}")),
            };
            match (messages(&v, "messages"), tools, hidden) {
                (Ok(m), Ok(tools), Ok(hidden)) if !m.is_empty() => {
                    self.generation = Some(generation);
                    return Ok(Reset {
                        messages: m,
                        tools,
                        hidden,
                    });
                }
                (m, t, h) => {
                    let why = (m.err().or(t.err()).or(h.err())).unwrap_or("no `messages`".into());
                    self.pool.failure(format!(
                        "environment program `{}` answered reset with {}: {why}",
                        self.pool.display(),
                        quote(&v.to_string())
                    ))?;
                }
            }
        }
    }
}

impl Environment for ProgramEnv {
    fn reset(&mut self, seed: u64) -> Result<Reset> {
        self.reset_with(seed, None)
    }

    fn reset_row(&mut self, seed: u64, row: &Value) -> Result<Reset> {
        self.reset_with(seed, Some(row))
    }

    fn step(&mut self, message: &str, deadline: Instant) -> Result<StepResult> {
        let req = json!({"op": "step", "episode": self.episode,
                         "message": {"role": "assistant", "content": message}});
        let generation = Some(self.generation.unwrap_or(u64::MAX));
        match self.pool.request(self.slot, generation, &req, deadline)? {
            Err(why) => Ok(StepResult::failed(why)),
            Ok((v, _)) => match parse_step(&v) {
                Ok(s) => Ok(s),
                Err(why) => Ok(StepResult::failed(self.pool.failure(format!(
                    "environment program `{}` answered step with {}: {why}",
                    self.pool.display(),
                    quote(&v.to_string())
                ))?)),
            },
        }
    }

    fn close(&mut self) {
        if let Some(g) = self.generation.take() {
            let req = json!({"op": "close", "episode": self.episode});
            let deadline = Instant::now() + self.pool.timeout.min(Duration::from_secs(1));
            // Best effort: a failure here is counted and shows on the next request.
            let _ = self.pool.request(self.slot, Some(g), &req, deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{EnvKind, Factory};

    fn cfg(program: Vec<String>, timeout_s: f64, max_failures: usize) -> EnvConfig {
        EnvConfig {
            kind: EnvKind::Program,
            program,
            step_timeout_s: timeout_s,
            max_consecutive_failures: max_failures,
            pool: 2,
            ..Default::default()
        }
    }

    fn hangman() -> Vec<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/env_hangman.py");
        vec!["python3".into(), path.into()]
    }

    /// A python program answering resets normally and steps by `mode` (hang, crash, garbage).
    fn faulty(step_body: &str) -> Vec<String> {
        let py = format!(
            "import sys, json\nfor line in sys.stdin:\n    r = json.loads(line)\n    \
             if r['op'] == 'reset':\n        print(json.dumps({{'messages': [{{'role': 'user', \
             'content': 'go'}}]}}), flush=True)\n    else:\n        {step_body}\n"
        );
        vec!["python3".into(), "-c".into(), py]
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn the_hangman_example_plays_through_the_pool() {
        let f = Factory::new(&cfg(hangman(), 10.0, 3)).unwrap();
        // Episodes 0 and 2 share process 0, episode 1 runs on process 1.
        let mut envs: Vec<_> = (0..3).map(|i| f.make(i)).collect();
        for e in &mut envs {
            let r = e.reset(42).unwrap();
            assert_eq!(r.messages[0].content, "hangman: _ _ _ _. guess one letter.");
            assert_eq!(r.hidden.as_deref(), Some("word leaf"));
        }
        // random.Random(42).choice(WORDS) is "leaf" in CPython.
        let s = envs[0].step("e", soon()).unwrap();
        assert_eq!(s.messages[0].content, "yes: _ e _ _");
        assert_eq!((s.reward, s.done), (0.0, false));
        let s = envs[2].step("z", soon()).unwrap();
        assert_eq!(s.messages[0].content, "no: _ _ _ _");
        envs[0].step("l", soon()).unwrap();
        envs[0].step("a", soon()).unwrap();
        let s = envs[0].step("f", soon()).unwrap();
        assert_eq!(
            (s.reward, s.done, s.info["success"].clone()),
            (1.0, true, json!(true))
        );
        for e in &mut envs {
            e.close();
        }
    }

    /// With `env.data` the reset carries the row's fields: the example plays the row's word.
    #[test]
    fn the_hangman_example_plays_the_word_of_a_dataset_row() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("words.jsonl");
        std::fs::write(&data, "{\"word\": \"ox\"}\n{\"word\": \"kiwi\"}\n").unwrap();
        let mut c = cfg(hangman(), 10.0, 3);
        c.data = Some(data.display().to_string());
        c.heldout_data = Some(data.display().to_string());
        let f = Factory::new(&c).unwrap();
        assert_eq!(f.rows().len(), 2);
        assert_eq!(f.rows()[1].at, format!("{}: line 2", data.display()));
        let mut e = f.make(0);
        let r = e.reset_row(7, &f.rows()[0].fields).unwrap();
        assert_eq!(r.messages[0].content, "hangman: _ _. guess one letter.");
        assert_eq!(r.hidden.as_deref(), Some("word ox"));
        let s = e.step("o", soon()).unwrap();
        assert_eq!(s.messages[0].content, "yes: o _");
        let s = e.step("x", soon()).unwrap();
        assert_eq!((s.reward, s.done), (1.0, true));
        e.close();
        // A row that is not an object is named with its file and line.
        std::fs::write(&data, "{\"word\": \"ox\"}\n[1, 2]\n").unwrap();
        let err = Factory::new(&c).err().unwrap().to_string();
        assert!(
            err.contains("words.jsonl: line 2") && err.contains("expected an object"),
            "{err}"
        );
        // Built-in environments draw from their seed and refuse rows.
        let mut g = c.clone();
        g.kind = EnvKind::Guess;
        g.program = vec![];
        assert!(g.validate().unwrap_err().contains("env.data applies to"));
    }

    #[test]
    fn a_hanging_program_times_out_and_the_episode_ends_with_the_reason() {
        // Resets get the configured 30 s (python may start slowly on a loaded machine); the
        // step is given half a second.
        let f = Factory::new(&cfg(faulty("import time; time.sleep(60)"), 30.0, 5)).unwrap();
        let mut e = f.make(0);
        e.reset(1).unwrap();
        // Episode 2 lives on the same process (slot 0 of 2).
        let mut neighbour = f.make(2);
        neighbour.reset(3).unwrap();
        let t0 = Instant::now();
        let s = e
            .step("hi", Instant::now() + Duration::from_millis(500))
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(s.done && s.reward == 0.0);
        let why = s.info["error"].as_str().unwrap();
        assert!(why.contains("no answer line before the deadline"), "{why}");
        assert!(why.contains("python3 -c"), "{why}");
        // The process was killed: its other episode has lost its state; a new episode starts
        // on a fresh process.
        let s = neighbour.step("x", soon()).unwrap();
        assert_eq!(
            s.info["error"],
            "the program was restarted; this episode's state was lost"
        );
        e.reset(2).unwrap();
    }

    #[test]
    fn garbage_and_crashes_are_observations_until_they_repeat() {
        let f = Factory::new(&cfg(faulty("print('hello there', flush=True)"), 30.0, 3)).unwrap();
        let mut e = f.make(0);
        // A reset reply without `hidden` exposes none.
        assert_eq!(e.reset(1).unwrap().hidden, None);
        let s = e.step("hi", soon()).unwrap();
        let why = s.info["error"].as_str().unwrap();
        assert!(
            why.contains("printed \"hello there\", expected one JSON object"),
            "{why}"
        );
        let f = Factory::new(&cfg(faulty("sys.exit(4)"), 30.0, 3)).unwrap();
        let mut e = f.make(0);
        e.reset(1).unwrap();
        let s = e.step("hi", soon()).unwrap();
        let why = s.info["error"].as_str().unwrap();
        assert!(why.contains("exited (exit status: 4)"), "{why}");
        // Failures 2 and 3 in a row (max_consecutive_failures = 3): the run stops, naming
        // the program.
        e.reset(1).unwrap();
        e.step("hi", soon()).unwrap();
        e.reset(1).unwrap();
        let err = e.step("hi", soon()).unwrap_err().to_string();
        assert!(err.contains("environment program `python3 -c"), "{err}");
        assert!(err.contains("failed 3 times in a row"), "{err}");
        // A program that cannot start at all stops the run at reset.
        let f = Factory::new(&cfg(vec!["/nonexistent/env-program".into()], 30.0, 2)).unwrap();
        let err = f.make(0).reset(1).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/env-program") && err.contains("cannot start"),
            "{err}"
        );
    }

    /// A reset reply's `hidden` must be a string; anything else is a failed reset, named.
    #[test]
    fn a_hidden_state_that_is_not_a_string_fails_the_reset() {
        let py = "import sys, json\nfor line in sys.stdin:\n    print(json.dumps({'messages': \
                  [{'role': 'user', 'content': 'go'}], 'hidden': 5}), flush=True)\n";
        let argv = vec!["python3".into(), "-c".into(), py.into()];
        let f = Factory::new(&cfg(argv, 30.0, 1)).unwrap();
        let err = f.make(0).reset(1).unwrap_err().to_string();
        assert!(
            err.contains("`hidden`: expected a string, found 5"),
            "{err}"
        );
    }
}

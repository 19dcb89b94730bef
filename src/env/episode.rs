//! Multi-turn episodes, turn by turn on a kept KV cache.
//!
//! Each turn the model writes a message (sampled until EOS), the environment answers, and
//! the answer's tokens are appended to the cache behind the model's own: nothing already
//! cached is read again. The response of an episode is everything after its first prompt;
//! `trainable` marks the tokens the model sampled, the only ones the learner trains on.
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use super::{EnvConfig, Environment, Factory, Message, Reset, Start, StepResult};
use crate::error::{Error, Result};
use crate::model::{CausalLm, ChatTemplate, Tokenizer};
use crate::rollout::session::Session;
use crate::rollout::SamplingParams;

/// How messages become tokens.
pub enum Transcript {
    /// Plain text for models without a chat template (the built-in one): each environment
    /// message is its content and a newline; the model's message ends with EOS.
    Plain,
    /// The model's chat template, with the environment's tools as `tools`.
    Chat(Box<ChatTemplate>),
}

impl Transcript {
    /// The chat template of `tok` when it has one, else plain text.
    pub fn for_tokenizer(tok: &Tokenizer, model: &str) -> Result<Self> {
        match ChatTemplate::from_tokenizer(tok, model) {
            Some(t) => Ok(Transcript::Chat(Box::new(t?))),
            None => Ok(Transcript::Plain),
        }
    }

    /// Renders through the chat template. A template that ignores `tools` (the same text
    /// with and without them, e.g. SmolLM2's) would never show the model what it may call:
    /// the tools then go into the system message in the Hermes form that Qwen2.5's template
    /// writes ([`hermes_tool_prompt`]).
    fn render(
        t: &ChatTemplate,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let with = t.render_with_tools(messages, tools, add_generation_prompt)?;
        if tools.is_empty() || with != t.render_with_tools(messages, &[], add_generation_prompt)? {
            return Ok(with);
        }
        let mut msgs = messages.to_vec();
        let instructions = hermes_tool_prompt(tools);
        match msgs.first_mut() {
            Some(m) if m.role == "system" => {
                m.content = format!("{}\n\n{instructions}", m.content);
            }
            _ => msgs.insert(
                0,
                Message {
                    role: "system".into(),
                    content: instructions,
                },
            ),
        }
        t.render_with_tools(&msgs, tools, add_generation_prompt)
    }

    fn plain_text(messages: &[Message]) -> String {
        messages
            .iter()
            .map(|m| format!("{}\n", m.content))
            .collect()
    }

    /// Text and token ids of an episode's first prompt.
    pub fn prompt(&self, tok: &Tokenizer, reset: &Reset) -> Result<(String, Vec<u32>)> {
        match self {
            Transcript::Plain => {
                let text = Self::plain_text(&reset.messages);
                let mut ids: Vec<u32> = tok.bos.into_iter().collect();
                ids.extend(tok.encode(&text)?);
                Ok((text, ids))
            }
            Transcript::Chat(t) => {
                let text = Self::render(t, &reset.messages, &reset.tools, true)?;
                let ids = tok.encode(&text)?;
                Ok((text, ids))
            }
        }
    }

    /// The tokens that follow the model's last message (already in `history`, its EOS
    /// cached) up to the model's next turn, given the environment's `new` messages. None when
    /// the chat template renders the earlier turns differently once new ones follow (the
    /// cached prefix would no longer be the conversation).
    fn continuation(
        &self,
        tok: &Tokenizer,
        held: &mut String,
        history: &[Message],
        tools: &[Value],
        new: &[Message],
    ) -> Result<Option<Vec<u32>>> {
        match self {
            Transcript::Plain => Ok(Some(tok.encode(&Self::plain_text(new))?)),
            Transcript::Chat(t) => {
                let mut all = history.to_vec();
                all.extend_from_slice(new);
                let full = Self::render(t, &all, tools, true)?;
                let Some(delta) = full.strip_prefix(held.as_str()) else {
                    return Ok(None);
                };
                let ids = tok.encode(delta)?;
                *held = full;
                Ok(Some(ids))
            }
        }
    }
}

/// The Hermes tool instructions around the schemas (Qwen2.5's chat template's text).
const HERMES_TOOLS_INTRO: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n";
const HERMES_TOOLS_CALL: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// Tool instructions in the Hermes form (the text Qwen2.5's chat template writes for its
/// `tools`): the schemas inside `<tools>`, one JSON object per line, and the call format.
pub fn hermes_tool_prompt(tools: &[Value]) -> String {
    let schemas: Vec<String> = tools.iter().map(Value::to_string).collect();
    format!(
        "{HERMES_TOOLS_INTRO}{}{HERMES_TOOLS_CALL}",
        schemas.join("\n")
    )
}

/// One finished episode.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub seed: u64,
    /// The dataset row it started from (`file: line 3`), with `env.data`.
    pub row: Option<String>,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    /// Everything after the prompt: model turns and environment messages.
    pub response_ids: Vec<u32>,
    /// The sampler's log-probs of model tokens; 0 for environment tokens.
    pub logprobs: Vec<f32>,
    /// True for the tokens the model sampled.
    pub trainable: Vec<bool>,
    /// The whole conversation, first messages included.
    pub messages: Vec<Message>,
    pub tools: Vec<Value>,
    /// Reward of each environment step, in turn order.
    pub rewards: Vec<f64>,
    pub infos: Vec<Value>,
    /// The environment ended it (false: a limit, a cut turn or a failure did).
    pub ended_by_env: bool,
    /// Why it ended: "done", "max_turns", "max_tokens", "chat template rewrote earlier
    /// turns", or a failure.
    pub stop: String,
    /// The last step's info said `"success": true`.
    pub success: bool,
    /// The environment's hidden state at reset ([`super::Reset::hidden`]), never in the
    /// prompt.
    pub hidden: Option<String>,
}

impl Episode {
    /// Σ_t γ^t r_t over the turns.
    pub fn discounted_return(&self, discount: f64) -> f64 {
        crate::reward::gates::discount_turns(&self.rewards, discount)
            .iter()
            .sum()
    }

    /// The transcript as saved in samples.jsonl (and read back by the reward pipeline).
    pub fn to_json(&self) -> Value {
        let mut v = json!({"seed": self.seed, "messages": self.messages, "tools": self.tools,
               "rewards": self.rewards, "infos": self.infos, "stop": self.stop,
               "success": self.success});
        if let Some(row) = &self.row {
            v["row"] = json!(row);
        }
        v
    }

    fn push(&mut self, tokens: &[u32], logprobs: Option<&[f32]>) {
        self.response_ids.extend_from_slice(tokens);
        match logprobs {
            Some(lp) => self.logprobs.extend_from_slice(lp),
            None => self.logprobs.extend(std::iter::repeat_n(0.0, tokens.len())),
        }
        self.trainable
            .extend(std::iter::repeat_n(logprobs.is_some(), tokens.len()));
    }
}

/// What the reward pipeline sees of an episode saved by [`Episode::to_json`]: its per-turn
/// rewards discounted by `discount`, whether the environment ended it (`ended_by_env`, the
/// experience's `finished`), its success, and the milestones its steps reported (each info's
/// `milestones`, a list of names, or `milestone`, one name).
pub fn pipeline_view(
    episode: &Value,
    ended_by_env: bool,
    discount: f64,
) -> std::result::Result<(crate::reward::pipeline::EpisodeTurns, Vec<String>), String> {
    let rewards: Vec<f64> = episode
        .get("rewards")
        .and_then(Value::as_array)
        .ok_or("the episode has no `rewards` list")?
        .iter()
        .map(|r| r.as_f64().ok_or(format!("`rewards`: {r} is not a number")))
        .collect::<std::result::Result<_, _>>()?;
    // Each turn's milestones (`milestone`: one name, `milestones`: a list).
    let per_turn: Vec<Vec<String>> = episode
        .get("infos")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|info| {
            let one = info
                .get("milestone")
                .and_then(Value::as_str)
                .map(String::from);
            let listed = info.get("milestones").and_then(Value::as_array);
            one.into_iter()
                .chain(
                    listed
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m.as_str().map(String::from)),
                )
                .collect()
        })
        .collect();
    let milestones = per_turn.iter().flatten().cloned().collect();
    let turns = crate::reward::pipeline::EpisodeTurns {
        discounted: crate::reward::gates::discount_turns(&rewards, discount),
        ended_by_env,
        success: episode.get("success") == Some(&Value::Bool(true)),
        rewards,
        milestones: per_turn,
    };
    Ok((turns, milestones))
}

/// The time an episode's actions took (duration-aware updates): the sum of its steps'
/// `info.duration_s`, where a step without a finite, non-negative `duration_s` (an unparsable
/// action) counts `unparsable` seconds. NaN when no step has one (then the whole sample is
/// unparsable and gets the fixed duration), or when `episode` is not an episode.
pub fn episode_exec_time(episode: &Value, unparsable: f64) -> f64 {
    let infos = episode
        .get("infos")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    exec_time(infos, unparsable)
}

/// [`episode_exec_time`] of an episode's step infos.
pub fn exec_time(infos: &[Value], unparsable: f64) -> f64 {
    let times: Vec<Option<f64>> = infos
        .iter()
        .map(|i| {
            i.get("duration_s")
                .and_then(Value::as_f64)
                .filter(|d| d.is_finite() && *d >= 0.0)
        })
        .collect();
    if times.iter().all(Option::is_none) {
        return f64::NAN;
    }
    times.iter().map(|t| t.unwrap_or(unparsable)).sum()
}

/// Maps `f` over `items` on up to `width` threads, in order.
fn par_map<T: Send, R: Send>(items: Vec<T>, width: usize, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    if width <= 1 || items.len() <= 1 {
        return items.into_iter().map(f).collect();
    }
    let per = items.len().div_ceil(width);
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(per).collect());
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || c.into_iter().map(f).collect::<Vec<R>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an environment thread panicked"))
            .collect()
    })
}

/// How long past its deadline a step may take to come back: a tool or program killed at the
/// deadline needs a moment to report it (as an error observation or a failed episode).
pub const STEP_GRACE: Duration = Duration::from_millis(500);

/// One step under the time limit, counted while it runs: the step runs on its own thread
/// with the deadline `timeout` from now (tools and programs stop at it), and one that has
/// not returned by the deadline plus [`STEP_GRACE`] is abandoned: the episode ends with the
/// reason and the environment instance is not used again (None).
pub fn timed_step(
    mut env: Box<dyn Environment>,
    text: String,
    timeout: Duration,
) -> (Option<Box<dyn Environment>>, Result<StepResult>) {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = env.step(&text, deadline);
        // The receiver is gone when the step was abandoned: nothing to do then.
        let _ = tx.send((env, r));
    });
    match rx.recv_timeout(timeout + STEP_GRACE) {
        Ok((env, r)) => (Some(env), r),
        Err(_) => (
            None,
            Ok(StepResult::failed(format!(
                "the step did not return within env.step_timeout_s = {} (abandoned after {:.3} s)",
                timeout.as_secs_f64(),
                t0.elapsed().as_secs_f64()
            ))),
        ),
    }
}

/// What an episode rollout needs besides the model.
pub struct Rollout<'a> {
    pub tok: &'a Tokenizer,
    pub transcript: &'a Transcript,
    pub factory: &'a Factory,
    pub params: SamplingParams,
}

impl Rollout<'_> {
    fn cfg(&self) -> &EnvConfig {
        self.factory.config()
    }

    /// Environments reset for `starts`, their episodes with first prompts, and the text of
    /// each prompt (what a chat transcript's cache holds).
    #[allow(clippy::type_complexity)]
    fn start(
        &self,
        starts: &[Start],
        first_id: u64,
        width: usize,
    ) -> Result<(Vec<Option<Box<dyn Environment>>>, Vec<Episode>, Vec<String>)> {
        let cfg = self.cfg();
        let mut envs: Vec<Box<dyn Environment>> = (0..starts.len())
            .map(|i| self.factory.make(first_id + i as u64))
            .collect();
        let resets = par_map(
            envs.iter_mut().zip(starts).collect(),
            width,
            |(e, s)| match &s.row {
                Some(row) => e.reset_row(s.seed, &row.fields),
                None => e.reset(s.seed),
            },
        );
        let mut eps = Vec::with_capacity(starts.len());
        let mut held = Vec::with_capacity(starts.len());
        for (reset, start) in resets.into_iter().zip(starts) {
            let seed = start.seed;
            let reset = reset?;
            let (text, ids) = self.transcript.prompt(self.tok, &reset)?;
            if ids.len() + self.params.max_new_tokens > cfg.max_tokens {
                return Err(Error::config(
                    "env",
                    format!(
                        "episode seed {seed}: the first prompt has {} tokens; with \
                         rollout.max_new_tokens = {} that exceeds env.max_tokens = {}",
                        ids.len(),
                        self.params.max_new_tokens,
                        cfg.max_tokens
                    ),
                ));
            }
            held.push(text.clone());
            eps.push(Episode {
                seed,
                row: start.row.as_ref().map(|r| r.at.clone()),
                prompt: text,
                prompt_ids: ids,
                response_ids: vec![],
                logprobs: vec![],
                trainable: vec![],
                messages: reset.messages,
                tools: reset.tools,
                rewards: vec![],
                infos: vec![],
                ended_by_env: false,
                stop: String::new(),
                success: false,
                hidden: reset.hidden,
            });
        }
        Ok((envs.into_iter().map(Some).collect(), eps, held))
    }

    /// Plays one episode per start, all at once; episode `i` is numbered `first_id + i` (for
    /// program environments). Draws from `rng` as [`Session::sample`] does.
    pub fn run<M: CausalLm + ?Sized, R: Rng>(
        &self,
        model: &M,
        starts: &[Start],
        first_id: u64,
        rng: &mut R,
    ) -> Result<Vec<Episode>> {
        let cfg = self.cfg();
        let max_pos = model.config().max_positions();
        if cfg.max_tokens > max_pos {
            return Err(Error::config(
                "env",
                format!(
                    "env.max_tokens = {} exceeds the model's {max_pos} positions",
                    cfg.max_tokens
                ),
            ));
        }
        // Every kind steps its episodes concurrently, `env.pool` at a time; results come back
        // in episode order, so the run does not depend on which step finished first.
        let width = cfg.pool;
        let (mut envs, mut eps, mut held) = self.start(starts, first_id, width)?;
        let prompts: Vec<Vec<u32>> = eps.iter().map(|e| e.prompt_ids.clone()).collect();
        let mut session = Session::new(model, &prompts, self.tok.pad)?;
        let mut turns = vec![0usize; eps.len()];
        loop {
            let active: Vec<bool> = eps.iter().map(|e| e.stop.is_empty()).collect();
            if !active.contains(&true) {
                break;
            }
            let gens = session.sample(&active, self.tok.eos, &self.params, rng)?;
            let mut closing = vec![Vec::new(); eps.len()];
            // The model's turns; those that ended with EOS go to their environment.
            let mut to_step = Vec::new();
            for (i, g) in gens.into_iter().enumerate() {
                let Some(g) = g else { continue };
                let ep = &mut eps[i];
                ep.push(&g.tokens, Some(&g.logprobs));
                let body: Vec<u32> = g
                    .tokens
                    .iter()
                    .copied()
                    .filter(|&t| t != self.tok.eos)
                    .collect();
                let text = self.tok.decode(&body)?;
                if let Transcript::Chat(t) = self.transcript {
                    held[i].push_str(&text);
                    held[i].push_str(t.eos_token.as_deref().unwrap_or(""));
                }
                ep.messages.push(Message {
                    role: "assistant".into(),
                    content: text.clone(),
                });
                turns[i] += 1;
                let len = ep.prompt_ids.len() + ep.response_ids.len();
                if !g.finished && len < cfg.max_tokens {
                    // A turn cut at rollout.max_new_tokens is closed by an EOS the model did
                    // not sample (not trained), so the transcript stays well-formed. A turn
                    // that already filled env.max_tokens gets none: no turn can follow it, and
                    // one more token would pass the limit (and the model's positions).
                    ep.push(&[self.tok.eos], None);
                    closing[i] = vec![self.tok.eos];
                }
                to_step.push((i, text));
            }
            let timeout = Duration::from_secs_f64(cfg.step_timeout_s);
            let mut jobs = Vec::with_capacity(to_step.len());
            for (i, text) in to_step {
                match envs[i].take() {
                    Some(e) => jobs.push((i, e, text)),
                    None => {
                        return Err(Error::Internal(format!(
                            "episode {i} stepped after its environment was abandoned"
                        )))
                    }
                }
            }
            let results = par_map(jobs, width, |(i, e, text)| {
                let (back, r) = timed_step(e, text, timeout);
                (i, back, r)
            });
            let mut appends = closing;
            for (i, back, r) in results {
                envs[i] = back;
                let r = r?;
                let ep = &mut eps[i];
                ep.rewards.push(r.reward);
                ep.infos.push(r.info.clone());
                if r.done {
                    ep.ended_by_env = r.info.get("error").is_none();
                    ep.success = r.info.get("success") == Some(&Value::Bool(true));
                    ep.stop = match r.info.get("error").and_then(Value::as_str) {
                        Some(e) => e.to_string(),
                        None => "done".into(),
                    };
                    continue;
                }
                if turns[i] >= cfg.max_turns {
                    ep.stop = "max_turns".into();
                    continue;
                }
                let next = self.transcript.continuation(
                    self.tok,
                    &mut held[i],
                    &ep.messages,
                    &ep.tools,
                    &r.messages,
                )?;
                let Some(delta) = next else {
                    ep.stop = "chat template rewrote earlier turns".into();
                    continue;
                };
                let len = ep.prompt_ids.len() + ep.response_ids.len();
                if len + delta.len() + self.params.max_new_tokens > cfg.max_tokens {
                    ep.stop = "max_tokens".into();
                    continue;
                }
                ep.messages.extend(r.messages);
                ep.push(&delta, None);
                appends[i].extend(delta);
            }
            session.append(&appends)?;
        }
        for e in envs.iter_mut().flatten() {
            e.close();
        }
        Ok(eps)
    }

    /// The reference play of each start ([`Environment::demonstration`]) as an episode, for a
    /// supervised warm-up: the demonstrated messages are the model's turns (trainable, EOS
    /// after each), the environment answers them as in [`Self::run`]. None when the
    /// environment has no demonstration.
    pub fn demonstrate(&self, starts: &[Start]) -> Result<Option<Vec<Episode>>> {
        let cfg = self.cfg();
        if !cfg.kind.demonstrates() {
            return Ok(None);
        }
        // Built-in environments only (programs do not demonstrate): episode numbers unused.
        let (mut envs, mut eps, mut held) = self.start(starts, 0, 1)?;
        let timeout = Duration::from_secs_f64(cfg.step_timeout_s);
        for ((env, ep), held) in envs.iter_mut().zip(&mut eps).zip(&mut held) {
            let env = env
                .as_mut()
                .ok_or_else(|| Error::Internal("a fresh environment was missing".into()))?;
            let Some(turns) = env.demonstration() else {
                return Ok(None);
            };
            for text in turns {
                let mut ids = self.tok.encode(&text)?;
                ids.push(self.tok.eos);
                let zeros = vec![0.0f32; ids.len()];
                ep.push(&ids, Some(zeros.as_slice()));
                if let Transcript::Chat(t) = self.transcript {
                    held.push_str(&text);
                    held.push_str(t.eos_token.as_deref().unwrap_or(""));
                }
                ep.messages.push(Message {
                    role: "assistant".into(),
                    content: text.clone(),
                });
                let r = env.step(&text, Instant::now() + timeout)?;
                ep.rewards.push(r.reward);
                ep.infos.push(r.info.clone());
                if r.done {
                    ep.ended_by_env = r.info.get("error").is_none();
                    ep.success = r.info.get("success") == Some(&Value::Bool(true));
                    ep.stop = "done".into();
                    break;
                }
                let next = self.transcript.continuation(
                    self.tok,
                    held,
                    &ep.messages,
                    &ep.tools,
                    &r.messages,
                )?;
                let Some(delta) = next else {
                    ep.stop = "chat template rewrote earlier turns".into();
                    break;
                };
                ep.messages.extend(r.messages);
                ep.push(&delta, None);
            }
            env.close();
            let len = ep.prompt_ids.len() + ep.response_ids.len();
            if len > cfg.max_tokens {
                return Err(Error::config(
                    "env.max_tokens",
                    format!(
                        "the demonstration of episode seed {} has {len} tokens, more than \
                         env.max_tokens = {}",
                        ep.seed, cfg.max_tokens
                    ),
                ));
            }
        }
        Ok(Some(eps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::builtin::CalculatorArithmetic;
    use crate::env::tools::{Calculator, CommandTool, CommandToolConfig, Tool, Toolbox};
    use crate::env::{EnvConfig, EnvKind};
    use crate::model::{Config, Llama};
    use candle_core::Device;
    use rand::SeedableRng;
    use std::sync::Arc;

    /// The real GPT-2 tokenizer with a ChatML-like template whose turns end in EOS.
    fn chat_tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/models/gpt2-tiny-random/tokenizer.json"
        );
        let mut tok =
            Tokenizer::from_file(std::path::Path::new(path), None, "<|endoftext|>", None).unwrap();
        tok.chat_template = Some(
            "{% if tools %}tools: {{ tools | length }}\n{% endif %}\
             {% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\n{% endfor %}\
             {% if add_generation_prompt %}<|assistant|>{% endif %}"
                .into(),
        );
        tok
    }

    /// Through a chat template, turn by turn on the kept cache: the tokens of every episode
    /// spell exactly the template's rendering of its conversation, the tools reach the
    /// template, and only the sampled tokens are trainable.
    #[test]
    fn exec_time_sums_step_durations_and_prices_unparsable_actions() {
        let ep = json!({"infos": [{"duration_s": 3.0}, {"duration_s": null}, {"duration_s": 1.0}]});
        // 3 + 2 (the unparsable step's fixed duration) + 1
        assert_eq!(episode_exec_time(&ep, 2.0), 6.0);
        let ep = json!({"infos": [{"arm": null, "duration_s": null}]});
        assert!(episode_exec_time(&ep, 2.0).is_nan());
        assert!(episode_exec_time(&json!({"infos": []}), 2.0).is_nan());
        assert!(episode_exec_time(&json!({"infos": [{"duration_s": -1.0}]}), 2.0).is_nan());
        assert_eq!(
            episode_exec_time(&json!({"infos": [{"duration_s": 1.5}]}), 2.0),
            1.5
        );
    }

    #[test]
    fn chat_episodes_are_the_template_rendering_of_their_conversation() {
        let tok = chat_tokenizer();
        let transcript = Transcript::for_tokenizer(&tok, "gpt2").unwrap();
        let mut shape = Config::builtin_tiny(tok.vocab_size());
        shape.hidden_size = 32;
        shape.intermediate_size = 64;
        shape.max_position_embeddings = Some(256);
        let model = Llama::init(&shape, 1, &Device::Cpu).unwrap();
        for kind in [EnvKind::Guess, EnvKind::CalculatorArithmetic] {
            let cfg = EnvConfig {
                kind,
                max_turns: 3,
                max_tokens: 256,
                digits: 3,
                ..Default::default()
            };
            let factory = Factory::new(&cfg).unwrap();
            let rollout = Rollout {
                tok: &tok,
                transcript: &transcript,
                factory: &factory,
                params: SamplingParams {
                    temperature: 1.0,
                    top_p: 1.0,
                    max_new_tokens: 4,
                },
            };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
            let starts: Vec<Start> = [3, 3, 8].into_iter().map(Start::seed).collect();
            let eps = rollout.run(&model, &starts, 0, &mut rng).unwrap();
            let Transcript::Chat(t) = &transcript else {
                panic!("a chat transcript")
            };
            for e in &eps {
                let mut ids = e.prompt_ids.clone();
                ids.extend(&e.response_ids);
                // Decoding drops the special EOS; so does the expected text.
                let got = tok.decode(&ids).unwrap();
                let want = t
                    .render_with_tools(&e.messages, &e.tools, false)
                    .unwrap()
                    .replace("<|endoftext|>", "");
                assert_eq!(got, want.trim_end_matches('\n'), "{kind:?} {}", e.stop);
                assert_eq!(
                    e.prompt.starts_with("tools: 1\n"),
                    kind == EnvKind::CalculatorArithmetic
                );
                let sampled: usize = e.trainable.iter().filter(|t| **t).count();
                let env_tokens = e.response_ids.len() - sampled;
                assert!(!e.rewards.is_empty() && sampled >= 1);
                // Turns after the first were preceded by environment tokens (a cut turn's
                // closing EOS is one too).
                assert!(e.messages.len() <= 2 || env_tokens > 0, "{:?}", e.messages);
                assert!(e
                    .logprobs
                    .iter()
                    .zip(&e.trainable)
                    .all(|(l, t)| *t || *l == 0.0));
            }
            // Every guess episode that was not solved ran its 3 turns.
            if kind == EnvKind::Guess {
                assert!(eps.iter().all(|e| e.success || e.stop == "max_turns"));
            }
        }
    }

    /// A random tiny built-in model over `tok`'s vocabulary with `positions` positions.
    fn tiny_model(tok: &Tokenizer, positions: usize) -> Llama {
        let mut shape = Config::builtin_tiny(tok.vocab_size());
        shape.hidden_size = 32;
        shape.intermediate_size = 64;
        shape.max_position_embeddings = Some(positions);
        Llama::init(&shape, 1, &Device::Cpu).unwrap()
    }

    /// A turn cut at rollout.max_new_tokens that fills env.max_tokens exactly gets no closing
    /// EOS: the episode ends within the limit, on a model with exactly that many positions.
    /// (The closing EOS used to be fed anyway: "row 84: 257 tokens exceed
    /// max_position_embeddings 256" stopped a calculator run.)
    #[test]
    fn a_cut_turn_that_fills_env_max_tokens_ends_within_it() {
        let tok = Tokenizer::builtin_tool_text();
        let m = 6;
        let starts: Vec<Start> = (0..16).map(Start::seed).collect();
        let probe_factory = Factory::new(&EnvConfig::default()).unwrap();
        let probe = Rollout {
            tok: &tok,
            transcript: &Transcript::Plain,
            factory: &probe_factory,
            params: SamplingParams::greedy(m),
        };
        let (_, first, _) = probe.start(&starts, 0, 1).unwrap();
        let prompt = first[0].prompt_ids.len();
        assert!(first.iter().all(|e| e.prompt_ids.len() == prompt));
        let limit = prompt + m;
        let factory = Factory::new(&EnvConfig {
            max_tokens: limit,
            max_turns: 4,
            ..Default::default()
        })
        .unwrap();
        let rollout = Rollout {
            factory: &factory,
            params: SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens: m,
            },
            ..probe
        };
        let model = tiny_model(&tok, limit);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let eps = rollout.run(&model, &starts, 0, &mut rng).unwrap();
        let mut filled = 0;
        for e in &eps {
            let len = e.prompt_ids.len() + e.response_ids.len();
            assert!(len <= limit, "{len} tokens, env.max_tokens = {limit}");
            if len == limit {
                // The cut turn: all sampled, none closing; no second turn fits.
                filled += 1;
                assert_eq!(e.trainable.iter().filter(|t| **t).count(), m);
                assert!(e.stop == "max_tokens" || e.stop == "done", "{}", e.stop);
            }
        }
        assert!(filled > 0, "no episode filled env.max_tokens");
    }

    /// A reference play as the warm-up sees it: the demonstrated turns are the trainable
    /// tokens (each followed by EOS), the prompt and the tool's answer are not, and the episode
    /// is solved. An episode longer than env.max_tokens is an error naming the limit.
    #[test]
    fn demonstrations_train_only_the_demonstrated_turns() {
        let tok = Tokenizer::builtin_tool_text();
        let cfg = EnvConfig {
            kind: EnvKind::CalculatorArithmetic,
            digits: 4,
            max_tokens: 256,
            ..Default::default()
        };
        let factory = Factory::new(&cfg).unwrap();
        let rollout = Rollout {
            tok: &tok,
            transcript: &Transcript::Plain,
            factory: &factory,
            params: SamplingParams::greedy(96),
        };
        let starts: Vec<Start> = (0..3).map(Start::seed).collect();
        let eps = rollout.demonstrate(&starts).unwrap().unwrap();
        for e in &eps {
            assert!(e.success && e.ended_by_env && e.stop == "done", "{e:?}");
            let model_turns: Vec<&str> = e
                .messages
                .iter()
                .filter(|m| m.role == "assistant")
                .map(|m| m.content.as_str())
                .collect();
            assert_eq!(model_turns.len(), 2);
            assert!(model_turns[0].starts_with("<tool_call>{"));
            // The trainable tokens spell the two turns, each closed by EOS.
            let trained: Vec<u32> = e
                .response_ids
                .iter()
                .zip(&e.trainable)
                .filter(|(_, t)| **t)
                .map(|(id, _)| *id)
                .collect();
            let mut want = tok.encode(model_turns[0]).unwrap();
            want.push(tok.eos);
            want.extend(tok.encode(model_turns[1]).unwrap());
            want.push(tok.eos);
            assert_eq!(trained, want);
            // The rest is the calculator's answer line, which equals the reply.
            let env_text: Vec<u32> = e
                .response_ids
                .iter()
                .zip(&e.trainable)
                .filter(|(_, t)| !**t)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(
                tok.decode(&env_text).unwrap(),
                format!("{}\n", model_turns[1])
            );
        }
        // Guess has no reference play: no demonstration, no warm-up.
        let guess = Factory::new(&EnvConfig::default()).unwrap();
        let r = Rollout {
            factory: &guess,
            ..rollout
        };
        assert!(r.demonstrate(&starts).unwrap().is_none());
        let short = Factory::new(&EnvConfig {
            max_tokens: 120,
            ..cfg
        })
        .unwrap();
        let r = Rollout {
            tok: &tok,
            transcript: &Transcript::Plain,
            factory: &short,
            params: SamplingParams::greedy(8),
        };
        let e = r.demonstrate(&starts).unwrap_err().to_string();
        assert!(
            e.contains("env.max_tokens") && e.contains("more than env.max_tokens = 120"),
            "{e}"
        );
    }

    /// Program episodes step concurrently, one per process of `env.pool`: four steps that
    /// each sleep 1 s overlap in time (each reports when it ran).
    #[test]
    fn program_episodes_step_concurrently_across_the_pool() {
        let py = "import json, sys, time\nfor line in sys.stdin:\n    r = json.loads(line)\n    \
                  if r['op'] == 'reset':\n        out = {'messages': [{'role': 'user', 'content': 'go.'}]}\n    \
                  elif r['op'] == 'step':\n        t0 = time.time()\n        time.sleep(1.0)\n        \
                  out = {'messages': [], 'reward': 0.0, 'done': True, 'info': {'t0': t0, 't1': time.time()}}\n    \
                  else:\n        out = {}\n    print(json.dumps(out), flush=True)\n";
        let cfg = EnvConfig {
            kind: EnvKind::Program,
            program: vec!["python3".into(), "-c".into(), py.into()],
            pool: 4,
            max_turns: 1,
            max_tokens: 64,
            ..Default::default()
        };
        let tok = Tokenizer::builtin_text();
        let model = tiny_model(&tok, 64);
        let factory = Factory::new(&cfg).unwrap();
        let rollout = Rollout {
            tok: &tok,
            transcript: &Transcript::Plain,
            factory: &factory,
            params: SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens: 2,
            },
        };
        let starts: Vec<Start> = (0..4).map(Start::seed).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let eps = rollout.run(&model, &starts, 0, &mut rng).unwrap();
        let at = |k: &str| -> Vec<f64> {
            eps.iter()
                .map(|e| {
                    e.infos[0][k]
                        .as_f64()
                        .unwrap_or_else(|| panic!("{:?}", e.infos))
                })
                .collect()
        };
        let (starts_at, ends_at) = (at("t0"), at("t1"));
        let last_start = starts_at.iter().cloned().fold(f64::MIN, f64::max);
        let first_end = ends_at.iter().cloned().fold(f64::MAX, f64::min);
        assert!(
            last_start < first_end,
            "steps ran one after another: {starts_at:?} {ends_at:?}"
        );
    }

    /// Steps in flight at once, counted by the steps themselves.
    #[derive(Default)]
    struct Overlap {
        running: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    /// The built-in `guess` game, its steps counted in [`Overlap`]: a step waits (up to 5 s)
    /// until `want` steps have been in flight at once, so a pool that steps concurrently
    /// shows it whatever the machine's load, and the game's answers are unchanged.
    struct CountedGuess {
        game: crate::env::builtin::Guess,
        overlap: Arc<Overlap>,
        want: usize,
    }

    impl Environment for CountedGuess {
        fn reset(&mut self, seed: u64) -> Result<Reset> {
            self.game.reset(seed)
        }
        fn step(&mut self, message: &str, deadline: Instant) -> Result<StepResult> {
            use std::sync::atomic::Ordering::SeqCst;
            let now = self.overlap.running.fetch_add(1, SeqCst) + 1;
            self.overlap.most.fetch_max(now, SeqCst);
            let give_up = Instant::now() + Duration::from_secs(5);
            while self.overlap.most.load(SeqCst) < self.want && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(1));
            }
            let r = self.game.step(message, deadline);
            self.overlap.running.fetch_sub(1, SeqCst);
            r
        }
    }

    /// Built-in environments step concurrently through `env.pool` as programs do: with
    /// pool = 4, four steps are in flight at once (with pool = 1, one), and the episodes
    /// (tokens, log-probs, rewards, infos) are identical to pool = 1's, in episode order.
    #[test]
    fn every_environment_kind_steps_concurrently_and_the_pool_changes_no_result() {
        let tok = Tokenizer::builtin_text();
        let model = tiny_model(&tok, 96);
        let play = |pool: usize| {
            let cfg = EnvConfig {
                kind: EnvKind::Guess,
                guess_max: 4,
                max_turns: 3,
                max_tokens: 96,
                pool,
                ..Default::default()
            };
            let overlap = Arc::new(Overlap::default());
            let counted = Arc::clone(&overlap);
            let maker: crate::env::Maker = Arc::new(move |_episode| {
                Box::new(CountedGuess {
                    game: crate::env::builtin::Guess::new(4, 0.0),
                    overlap: Arc::clone(&counted),
                    want: pool,
                }) as Box<dyn Environment>
            });
            let factory = Factory::with_maker(&cfg, maker).unwrap();
            let rollout = Rollout {
                tok: &tok,
                transcript: &Transcript::Plain,
                factory: &factory,
                params: SamplingParams {
                    temperature: 1.0,
                    top_p: 1.0,
                    max_new_tokens: 3,
                },
            };
            let starts: Vec<Start> = (0..12).map(|i| Start::seed(i % 5)).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let eps = rollout.run(&model, &starts, 0, &mut rng).unwrap();
            (eps, overlap.most.load(std::sync::atomic::Ordering::SeqCst))
        };
        let (serial, one_at_a_time) = play(1);
        let (pooled, at_once) = play(4);
        assert_eq!((one_at_a_time, at_once), (1, 4));
        assert_eq!(serial, pooled);
        // The games were played: every episode stepped, and seeds repeat their secrets.
        assert!(serial.iter().all(|e| !e.rewards.is_empty()));
        assert_eq!(serial.len(), 12);
    }

    /// An environment whose step never looks at its deadline.
    struct Stuck;

    impl Environment for Stuck {
        fn reset(&mut self, _seed: u64) -> Result<Reset> {
            Ok(Reset::default())
        }
        fn step(&mut self, _message: &str, _deadline: Instant) -> Result<StepResult> {
            std::thread::sleep(Duration::from_secs(30));
            Ok(StepResult::failed("never seen"))
        }
    }

    /// Step time counts while the step runs: a tool command that sleeps is killed at the
    /// deadline and the model gets an error observation (the episode goes on); a step that
    /// ignores its deadline is abandoned at the deadline plus the grace.
    #[test]
    fn step_time_counts_while_the_step_runs() {
        let sleeper = CommandToolConfig {
            name: "slow".into(),
            command: vec![
                "python3".into(),
                "-c".into(),
                "import time; time.sleep(60)".into(),
            ],
            description: String::new(),
            parameters: None,
        };
        let tools = Toolbox::new(vec![
            Box::new(Calculator),
            Box::new(CommandTool::new(sleeper)),
        ]);
        let mut env = CalculatorArithmetic::new(2, tools);
        env.reset(1).unwrap();
        let timeout = Duration::from_millis(1000);
        let t0 = Instant::now();
        let call = "<tool_call>{\"name\": \"slow\", \"arguments\": {}}</tool_call>";
        let (back, r) = timed_step(Box::new(env), call.into(), timeout);
        let took = t0.elapsed();
        let r = r.unwrap();
        assert!(back.is_some(), "the environment stays usable");
        assert!(!r.done, "{r:?}");
        assert_eq!(r.messages[0].role, "tool");
        let obs = &r.messages[0].content;
        assert!(
            obs.starts_with("error: tool command `python3 -c")
                && obs.contains("no answer line before the deadline"),
            "{obs}"
        );
        assert!(took >= timeout && took < timeout + STEP_GRACE, "{took:?}");

        let timeout = Duration::from_millis(300);
        let t0 = Instant::now();
        let (back, r) = timed_step(Box::new(Stuck), "4".into(), timeout);
        let took = t0.elapsed();
        let r = r.unwrap();
        assert!(
            back.is_none(),
            "an abandoned step's environment is not reused"
        );
        assert!(r.done && r.reward == 0.0);
        let why = r.info["error"].as_str().unwrap();
        assert!(
            why.starts_with("the step did not return within env.step_timeout_s = 0.3"),
            "{why}"
        );
        assert!(
            took < timeout + STEP_GRACE + Duration::from_secs(1),
            "{took:?}"
        );
    }

    /// The pipeline reads back what an episode saved: per-turn rewards discounted, success,
    /// and the milestones of every step's info.
    #[test]
    fn the_pipeline_view_of_a_saved_episode() {
        let ep = json!({"seed": 1, "rewards": [0.5, 0.0, 1.0], "success": true,
            "infos": [{"milestone": "found-door"}, {"milestones": ["key", "found-door"]}, {}]});
        let (t, m) = pipeline_view(&ep, true, 0.5).unwrap();
        assert_eq!(t.discounted, vec![0.5, 0.0, 0.25]);
        assert!(t.ended_by_env && t.success);
        assert_eq!(m, vec!["found-door", "key", "found-door"]);
        // Per turn, for per-turn gates: the raw rewards and each step's milestones.
        assert_eq!(t.rewards, vec![0.5, 0.0, 1.0]);
        assert_eq!(
            t.milestones,
            vec![vec!["found-door"], vec!["key", "found-door"], vec![]]
        );
        let e = pipeline_view(&json!({"rewards": [1, "x"]}), true, 1.0).unwrap_err();
        assert_eq!(e, "`rewards`: \"x\" is not a number");
        assert!(pipeline_view(&json!({}), true, 1.0).is_err());
    }

    /// A chat template that ignores `tools` gets them as a Hermes system message; one that
    /// renders them is left alone.
    #[test]
    fn tools_reach_templates_that_ignore_them_through_the_system_message() {
        let mut tok = chat_tokenizer();
        tok.chat_template = Some(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
             {% if add_generation_prompt %}<|assistant|>{% endif %}"
                .into(),
        );
        let Transcript::Chat(t) = Transcript::for_tokenizer(&tok, "gpt2").unwrap() else {
            panic!("a chat transcript")
        };
        let tools = vec![Calculator.schema()];
        let msgs = vec![Message {
            role: "user".into(),
            content: "what is 2 * 3?".into(),
        }];
        let text = Transcript::render(&t, &msgs, &tools, true).unwrap();
        let want = format!(
            "<|system|>{}\n<|user|>what is 2 * 3?\n<|assistant|>",
            hermes_tool_prompt(&tools)
        );
        assert_eq!(text, want);
        assert!(
            text.contains("<tools>\n{\"") && text.contains("\"name\":\"calculator\""),
            "{text}"
        );
        assert!(
            text.contains("<tool_call>\n{\"name\": <function-name>"),
            "{text}"
        );
        // Without tools, nothing is added.
        let plain = Transcript::render(&t, &msgs, &[], true).unwrap();
        assert_eq!(plain, "<|user|>what is 2 * 3?\n<|assistant|>");
    }
}

//! Multi-turn episodes, turn by turn on a kept KV cache.
//!
//! Each turn the model writes a message (sampled until EOS), the environment answers, and
//! the answer's tokens are appended to the cache behind the model's own: nothing already
//! cached is read again. The response of an episode is everything after its first prompt;
//! `trainable` marks the tokens the model sampled, the only ones the learner trains on.
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use super::{EnvConfig, Environment, Factory, Message, Reset, StepResult};
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
                let text = t.render_with_tools(&reset.messages, &reset.tools, true)?;
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
                let full = t.render_with_tools(&all, tools, true)?;
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

/// One finished episode.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub seed: u64,
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
}

impl Episode {
    /// Σ_t γ^t r_t over the turns.
    pub fn discounted_return(&self, gamma: f64) -> f64 {
        self.rewards
            .iter()
            .enumerate()
            .map(|(t, r)| gamma.powi(t as i32) * r)
            .sum()
    }

    /// The transcript as saved in samples.jsonl.
    pub fn to_json(&self) -> Value {
        json!({"seed": self.seed, "messages": self.messages, "tools": self.tools,
               "rewards": self.rewards, "infos": self.infos, "stop": self.stop,
               "success": self.success})
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

/// One step with the time limit enforced on its result: a step that returns late ends the
/// episode like one that never returned.
fn timed_step(env: &mut dyn Environment, text: &str, timeout: Duration) -> Result<StepResult> {
    let t0 = Instant::now();
    let r = env.step(text, t0 + timeout)?;
    let took = t0.elapsed();
    if took > timeout {
        return Ok(StepResult::failed(format!(
            "the step took {:.3} s, over env.step_timeout_s = {}",
            took.as_secs_f64(),
            timeout.as_secs_f64()
        )));
    }
    Ok(r)
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

    /// Environments reset for `seeds`, their episodes with first prompts, and the text of
    /// each prompt (what a chat transcript's cache holds).
    #[allow(clippy::type_complexity)]
    fn start(
        &self,
        seeds: &[u64],
        first_id: u64,
        width: usize,
    ) -> Result<(Vec<Box<dyn Environment>>, Vec<Episode>, Vec<String>)> {
        let cfg = self.cfg();
        let mut envs: Vec<Box<dyn Environment>> = (0..seeds.len())
            .map(|i| self.factory.make(first_id + i as u64))
            .collect();
        let resets = par_map(envs.iter_mut().zip(seeds).collect(), width, |(e, &s)| {
            e.reset(s)
        });
        let mut eps = Vec::with_capacity(seeds.len());
        let mut held = Vec::with_capacity(seeds.len());
        for (reset, &seed) in resets.into_iter().zip(seeds) {
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
            });
        }
        Ok((envs, eps, held))
    }

    /// Plays one episode per seed, all at once; episode `i` is numbered `first_id + i` (for
    /// program environments). Draws from `rng` as [`Session::sample`] does.
    pub fn run<M: CausalLm + ?Sized, R: Rng>(
        &self,
        model: &M,
        seeds: &[u64],
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
        let width = match cfg.kind {
            super::EnvKind::Program => cfg.pool,
            _ => 1,
        };
        let (mut envs, mut eps, mut held) = self.start(seeds, first_id, width)?;
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
                if !g.finished {
                    // A turn cut at rollout.max_new_tokens is closed by an EOS the model did
                    // not sample (not trained), so the transcript stays well-formed.
                    ep.push(&[self.tok.eos], None);
                    closing[i] = vec![self.tok.eos];
                }
                to_step.push((i, text));
            }
            let timeout = Duration::from_secs_f64(cfg.step_timeout_s);
            let jobs: Vec<(usize, &mut Box<dyn Environment>, String)> = {
                let mut by_index: Vec<Option<&mut Box<dyn Environment>>> =
                    envs.iter_mut().map(Some).collect();
                to_step
                    .into_iter()
                    .map(|(i, text)| (i, by_index[i].take().expect("one step per episode"), text))
                    .collect()
            };
            let results = par_map(jobs, width, |(i, e, text)| {
                (i, timed_step(e.as_mut(), &text, timeout))
            });
            let mut appends = closing;
            for (i, r) in results {
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
        for e in &mut envs {
            e.close();
        }
        Ok(eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{EnvConfig, EnvKind};
    use crate::model::{Config, Llama};
    use candle_core::Device;
    use rand::SeedableRng;

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
            let eps = rollout.run(&model, &[3, 3, 8], 0, &mut rng).unwrap();
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
}

//! eva's mutator for text datasets (`[sampling.eva]` with `task.kind = "dataset"`, `gsm8k` or
//! `math500`): a selected prompt's question goes into `sampling.eva.generator_template`, the
//! policy itself (or the second model `sampling.eva.generator`) writes `children` new
//! questions with the run's sampler settings from the creator's seeded stream, and each one
//! that is not degenerate (empty, cut off at `generator_max_tokens`, the parent's question
//! again) becomes a training prompt with the parent's system message and template and no
//! reference answer (config validation keeps eva here to rewards that need none).
use std::path::Path;

use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::chat::{ChatTemplate, Message};
use crate::model::{Llama, Tokenizer};
use crate::rollout::engine::{LocalEngine, RolloutEngine};
use crate::sampling::eva::{EvaConfig, GENERATOR_PROMPT};
use crate::task::eva_pool::{Evolved, PoolPrompt};
use crate::train::explore::{response_text, Env};

/// The generator of a run's evolved text prompts.
pub struct TextGenerator {
    /// The second model and its tokenizer (None: the policy writes them with the run's
    /// tokenizer).
    second: Option<(Llama, Tokenizer)>,
    /// The second model's chat template, or the run tokenizer's.
    template: Option<ChatTemplate>,
}

/// Why a generation is not a new prompt (None: it is one).
pub fn degenerate(text: &str, finished: bool, parent_question: &str) -> Option<&'static str> {
    if text.is_empty() {
        Some("empty")
    } else if !finished {
        Some("too long")
    } else if text == parent_question.trim() {
        Some("the parent again")
    } else {
        None
    }
}

impl TextGenerator {
    /// The generator `cfg.generator` names, loaded once (a missing model is an error naming
    /// the key, before any step).
    pub fn new(cfg: &EvaConfig, tok: &Tokenizer, dev: &candle_core::Device) -> Result<Self> {
        let second = match cfg.generator_model() {
            Some(path) => {
                let p = crate::train::pretrained::model_path(path)
                    .map_err(|e| Error::config("sampling.eva.generator", e.to_string()))?;
                Some(crate::model::io::load_pretrained(Path::new(&p), dev)?)
            }
            None => None,
        };
        let (t, name) = match &second {
            Some((_, t)) => (t, cfg.generator.as_str()),
            None => (tok, "the policy"),
        };
        let template = ChatTemplate::from_tokenizer(t, name).transpose()?;
        Ok(TextGenerator { second, template })
    }

    /// The token ids of the instruction that asks for variants of `question`.
    fn instruction(&self, cfg: &EvaConfig, tok: &Tokenizer, question: &str) -> Result<Vec<u32>> {
        let text = cfg.generator_template.replace(GENERATOR_PROMPT, question);
        match &self.template {
            Some(t) => tok.encode(&t.render(&[Message::user(text)], true)?),
            None => tok.encode_with_bos(&text),
        }
    }

    /// `n` generations for `parent`, checked and turned into prompts of `task`.
    pub fn evolve(
        &self,
        env: &Env,
        policy: &Llama,
        parent: &PoolPrompt,
        n: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Evolved> {
        let cfg = &env.cfg.sampling.eva;
        let question = parent.question.as_deref().ok_or_else(|| {
            Error::Internal(format!(
                "sampling.eva: the pool prompt {:?} has no question to vary",
                parent.problem.prompt
            ))
        })?;
        let (model, tok) = match &self.second {
            Some((m, t)) => (m, t),
            None => (policy, &env.tok),
        };
        let ids = self.instruction(cfg, tok, question)?;
        let mut params = env.cfg.rollout.sampling();
        params.max_new_tokens = cfg.generator_max_tokens;
        let gens = LocalEngine::new(model, tok).generate_n(&[ids], n, &params, rng)?;
        let mut out = Evolved::default();
        for g in gens {
            let text = response_text(tok, &g.tokens)?;
            let text = text.trim();
            if degenerate(text, g.finished, question).is_some() {
                out.rejected += 1;
                continue;
            }
            match env.task.text_variant(&parent.problem, question, text) {
                Some(p) => out.children.push((p, Some(text.to_string()))),
                None => out.rejected += 1,
            }
        }
        Ok(out)
    }
}

/// Runs one creator round on `pool`: the task's own mutator, or `generator` for text.
pub fn evolve_round(
    env: &Env,
    policy: &Llama,
    generator: Option<&TextGenerator>,
    pool: &mut crate::task::eva_pool::PromptPool,
) -> Result<usize> {
    let cfg = &env.cfg.sampling.eva;
    match generator {
        Some(g) => {
            let key = |p: &crate::task::Problem| env.task.pool_key(p);
            pool.evolve_round_with(cfg, key, |parent, n, rng| {
                g.evolve(env, policy, parent, n, rng)
            })
        }
        None => pool.evolve_round(env.task.as_ref(), cfg),
    }
}

/// Whether a run's eva evolves text with a generator: a text dataset (no `[env]`, not the
/// built-in arithmetic) with creator rounds.
pub fn needs_generator(env: &Env) -> bool {
    let cfg = &env.cfg;
    cfg.sampling.eva.enabled()
        && cfg.sampling.eva.every > 0
        && cfg.env.is_none()
        && !cfg.task.kind.is_arithmetic()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_generations_are_named() {
        assert_eq!(degenerate("", true, "What is 2+2?"), Some("empty"));
        assert_eq!(
            degenerate("What is 3+5?", false, "What is 2+2?"),
            Some("too long")
        );
        assert_eq!(
            degenerate("What is 2+2?", true, "  What is 2+2?\n"),
            Some("the parent again")
        );
        assert_eq!(degenerate("What is 3+5?", true, "What is 2+2?"), None);
    }
}

//! One interface for where rollouts come from ([`RolloutEngine`]): local decoding on weights
//! in this process ([`LocalEngine`], also what `grove serve` answers with) and an
//! OpenAI-compatible completions server ([`RemoteRollouts`]: `grove serve`, vLLM, ...). The
//! explorers and the training loop's samplers call this trait, so a new engine is one more
//! implementation here.
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::remote::RemoteEngine;
use super::{generate, Generation, SamplingParams};
use crate::error::Result;
use crate::model::{CausalLm, Tokenizer};

/// Samples `n` responses per prompt.
pub trait RolloutEngine {
    /// `n` generations per prompt, prompt-major (prompt 0's `n`, then prompt 1's, ...). Each
    /// engine draws from `rng` in a fixed way, so a seeded run is reproducible.
    fn generate_n(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>>;

    /// The policy version the engine samples with, when it knows one (`grove serve` reports
    /// its checkpoint's); None otherwise.
    fn policy_version(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Decoding on a model in this process: every prompt repeated `n` times, one batch, one
/// uniform draw of `rng` per active sequence and token ([`generate`]).
pub struct LocalEngine<'a, M: CausalLm + ?Sized> {
    pub model: &'a M,
    pub eos: u32,
    pub pad: u32,
}

impl<'a, M: CausalLm + ?Sized> LocalEngine<'a, M> {
    /// The engine for `model` with the special tokens of `tok`.
    pub fn new(model: &'a M, tok: &Tokenizer) -> Self {
        LocalEngine {
            model,
            eos: tok.eos,
            pad: tok.pad,
        }
    }
}

impl<M: CausalLm + ?Sized> RolloutEngine for LocalEngine<'_, M> {
    fn generate_n(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>> {
        let repeated: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), n))
            .collect();
        generate(self.model, &repeated, self.eos, self.pad, params, rng)
    }
}

/// A completions server: one seed drawn from `rng` per call, sent with the requests.
pub struct RemoteRollouts<'a> {
    pub engine: &'a RemoteEngine,
    /// Turns the server's token strings back into ids.
    pub tok: &'a Tokenizer,
}

impl RolloutEngine for RemoteRollouts<'_> {
    fn generate_n(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        params: &SamplingParams,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Generation>> {
        self.engine
            .generate(self.tok, prompts, n, params, rng.gen())
    }

    fn policy_version(&self) -> Result<Option<u64>> {
        self.engine.policy_version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn local_engine_is_generate_on_the_repeated_prompts() {
        let tok = Tokenizer::builtin_arithmetic();
        let cfg = crate::model::Config::builtin_tiny(tok.vocab_size());
        let model = crate::model::Llama::init(&cfg, 5, &candle_core::Device::Cpu).unwrap();
        let prompts = vec![vec![1, 4, 5], vec![1, 6]];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 3,
        };
        let engine: &dyn RolloutEngine = &LocalEngine::new(&model, &tok);
        let got = engine
            .generate_n(&prompts, 2, &params, &mut ChaCha8Rng::seed_from_u64(9))
            .unwrap();
        let repeated = vec![
            prompts[0].clone(),
            prompts[0].clone(),
            prompts[1].clone(),
            prompts[1].clone(),
        ];
        let want = generate(
            &model,
            &repeated,
            tok.eos,
            tok.pad,
            &params,
            &mut ChaCha8Rng::seed_from_u64(9),
        )
        .unwrap();
        assert_eq!(got, want);
        assert_eq!(engine.policy_version().unwrap(), None);
    }
}

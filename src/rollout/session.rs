//! A decoding session that keeps its KV cache between calls: multi-turn episodes append the
//! environment's reply to what is already cached and decode the model's next turn, instead
//! of re-reading the whole conversation every turn.
//!
//! Rows of the batch advance independently. Each call feeds the same number of columns to
//! every row; a row with fewer new tokens is padded, and the padding is hidden by the
//! attention mask and does not advance the row's positions, so every row decodes exactly as
//! it would alone (the same scheme as [`super::generate`]).
use candle_core::Tensor;
use rand::Rng;
use rayon::prelude::*;

use super::{draw_uniform, sampler, Generation, SamplingParams};
use crate::error::{Error, Result};
use crate::model::{attention_mask, CausalLm, KvCache};

pub struct Session<'m, M: CausalLm + ?Sized> {
    model: &'m M,
    cache: KvCache,
    pad: u32,
    /// Which cached columns of each row are real tokens.
    key_valid: Vec<Vec<bool>>,
    /// Position of each row's next token (its real tokens so far).
    next_pos: Vec<u32>,
    /// Logits for each row's next token, after its last fed token.
    next_logits: Vec<Option<Vec<f32>>>,
    /// A sampled token not yet fed (the last one of a turn); fed before the row's next append.
    pending: Vec<Option<u32>>,
}

impl<'m, M: CausalLm + ?Sized> Session<'m, M> {
    /// Starts a session with one prompt per row.
    pub fn new(model: &'m M, prompts: &[Vec<u32>], pad: u32) -> Result<Self> {
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Model(format!(
                "prompt {i} is empty: nothing to condition on"
            )));
        }
        let b = prompts.len();
        let mut s = Session {
            model,
            cache: model.new_cache(),
            pad,
            key_valid: vec![Vec::new(); b],
            next_pos: vec![0; b],
            next_logits: vec![None; b],
            pending: vec![None; b],
        };
        s.append(prompts)?;
        Ok(s)
    }

    pub fn rows(&self) -> usize {
        self.next_pos.len()
    }

    /// Tokens held for `row` so far (its next position).
    pub fn row_len(&self, row: usize) -> usize {
        self.next_pos[row] as usize + usize::from(self.pending[row].is_some())
    }

    /// Appends `tokens[row]` to each row (empty: nothing for that row), after any token left
    /// pending by the last [`Session::sample`].
    pub fn append(&mut self, tokens: &[Vec<u32>]) -> Result<()> {
        if tokens.len() != self.rows() {
            return Err(Error::Model(format!(
                "session append: {} rows of tokens for a batch of {}",
                tokens.len(),
                self.rows()
            )));
        }
        let rows: Vec<Vec<u32>> = tokens
            .iter()
            .enumerate()
            .map(|(r, t)| {
                let mut v: Vec<u32> = self.pending[r].take().into_iter().collect();
                v.extend_from_slice(t);
                v
            })
            .collect();
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if t == 0 {
            return Ok(());
        }
        let max_pos = self.model.config().max_positions();
        for (r, row) in rows.iter().enumerate() {
            let need = self.next_pos[r] as usize + row.len();
            if need > max_pos {
                return Err(Error::Model(format!(
                    "row {r}: {need} tokens exceed max_position_embeddings {max_pos}"
                )));
            }
        }
        let b = self.rows();
        let offset = self.cache.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        for (r, row) in rows.iter().enumerate() {
            for j in 0..t {
                ids.push(row.get(j).copied().unwrap_or(self.pad));
                pos.push(self.next_pos[r] + j.min(row.len().saturating_sub(1)) as u32);
                self.key_valid[r].push(j < row.len());
            }
        }
        let dev = self.model.device();
        let ids_t = Tensor::from_vec(ids, (b, t), dev)?;
        let pos_t = Tensor::from_vec(pos, (b, t), dev)?;
        let mask = attention_mask(&self.key_valid, offset, t, dev)?;
        let hidden = self
            .model
            .forward_hidden(&ids_t, &pos_t, &mask, Some(&mut self.cache))?;
        // The hidden state after each fed row's last new token, in one gather.
        let fed: Vec<usize> = (0..b).filter(|&r| !rows[r].is_empty()).collect();
        let at: Vec<u32> = fed
            .iter()
            .map(|&r| (r * t + rows[r].len() - 1) as u32)
            .collect();
        let hs = hidden.dim(2)?;
        let h = hidden
            .reshape((b * t, hs))?
            .index_select(&Tensor::new(at.as_slice(), dev)?, 0)?;
        let logits: Vec<Vec<f32>> = self.model.logits(&h)?.to_vec2()?;
        for (&r, l) in fed.iter().zip(logits) {
            self.next_logits[r] = Some(l);
            self.next_pos[r] += rows[r].len() as u32;
        }
        Ok(())
    }

    /// Decodes one turn for each row where `active` is set (until EOS or
    /// `params.max_new_tokens`); other rows get None. Draws one uniform per active row per
    /// step, in row order, as [`super::generate`] does.
    pub fn sample<R: Rng>(
        &mut self,
        active: &[bool],
        eos: u32,
        params: &SamplingParams,
        rng: &mut R,
    ) -> Result<Vec<Option<Generation>>> {
        params.validate().map_err(Error::Model)?;
        let b = self.rows();
        if active.len() != b {
            return Err(Error::Model(format!(
                "session sample: {} flags for a batch of {b}",
                active.len()
            )));
        }
        if let Some(r) = (0..b).find(|&r| active[r] && self.next_logits[r].is_none()) {
            return Err(Error::Model(format!(
                "session row {r}: nothing fed since its last turn"
            )));
        }
        let mut out: Vec<Option<Generation>> = active
            .iter()
            .map(|&a| {
                a.then(|| Generation {
                    tokens: vec![],
                    logprobs: vec![],
                    finished: false,
                })
            })
            .collect();
        for step in 0..params.max_new_tokens {
            let running = |g: &Option<Generation>| g.as_ref().is_some_and(|g| !g.finished);
            let draws: Vec<Option<f64>> = out
                .iter()
                .map(|g| running(g).then(|| draw_uniform(params, rng)))
                .collect();
            let logits = &self.next_logits;
            let picks: Vec<Option<(u32, f32)>> = draws
                .par_iter()
                .enumerate()
                .map_init(sampler::Scratch::default, |s, (r, d)| {
                    d.map(|u| {
                        let row = logits[r].as_deref().unwrap_or(&[]);
                        sampler::sample_with_uniform(row, params, u, s)
                    })
                })
                .collect();
            let mut feed = vec![Vec::new(); b];
            for (r, pick) in picks.into_iter().enumerate() {
                let (Some((tok, lp)), Some(g)) = (pick, out[r].as_mut()) else {
                    continue;
                };
                g.tokens.push(tok);
                g.logprobs.push(lp);
                g.finished = tok == eos;
                self.next_logits[r] = None;
                let last = g.finished || step + 1 == params.max_new_tokens;
                if last {
                    self.pending[r] = Some(tok);
                } else {
                    feed[r].push(tok);
                }
            }
            if feed.iter().all(Vec::is_empty) {
                break;
            }
            self.append(&feed)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::batch;
    use crate::model::{Config, Llama};
    use candle_core::Device;
    use rand::SeedableRng;

    /// Two turns per row with the cache kept, rows of different lengths: the sampled
    /// log-probs are the model's teacher-forced log-probs of the whole sequence, and the
    /// first turn is what `generate` samples from the same prompts and seed.
    #[test]
    fn turns_on_a_kept_cache_match_teacher_forcing_and_generate() {
        let dev = Device::Cpu;
        let mut cfg = Config::builtin_tiny(19);
        cfg.max_position_embeddings = Some(128);
        let model = Llama::init(&cfg, 7, &dev).unwrap();
        let (eos, pad) = (2u32, 0u32);
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 5,
        };
        let prompts = vec![vec![1u32, 5, 6, 7], vec![1, 9], vec![1, 4, 4, 4, 4, 4, 8]];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let reference =
            crate::rollout::generate(&model, &prompts, eos, pad, &params, &mut rng).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut s = Session::new(&model, &prompts, pad).unwrap();
        let first = s.sample(&[true; 3], eos, &params, &mut rng).unwrap();
        let first: Vec<Generation> = first.into_iter().map(Option::unwrap).collect();
        for (a, b) in first.iter().zip(&reference) {
            assert_eq!((&a.tokens, a.finished), (&b.tokens, b.finished));
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
        // Environment replies of different lengths (row 1 gets none and sits the turn out).
        let replies = vec![vec![10u32, 11, 12], vec![], vec![13]];
        s.append(&replies).unwrap();
        let second = s
            .sample(&[true, false, true], eos, &params, &mut rng)
            .unwrap();
        assert!(second[1].is_none());
        for r in [0usize, 2] {
            let g2 = second[r].as_ref().unwrap();
            let mut resp = first[r].tokens.clone();
            resp.extend(&replies[r]);
            let start2 = resp.len();
            resp.extend(&g2.tokens);
            let b = batch::build(&prompts[r..r + 1], &[resp.clone()], pad, &dev).unwrap();
            let (lp, _) = batch::response_logprobs(&model, &b, 1.0).unwrap();
            let lp = &batch::to_f64_rows(&lp).unwrap()[0];
            let sampled: Vec<f32> = first[r]
                .logprobs
                .iter()
                .chain(&g2.logprobs)
                .copied()
                .collect();
            let forced: Vec<f64> = lp[..first[r].tokens.len()]
                .iter()
                .chain(&lp[start2..start2 + g2.tokens.len()])
                .copied()
                .collect();
            for (a, b) in sampled.iter().zip(&forced) {
                assert!((*a as f64 - b).abs() < 1e-4, "row {r}: {a} vs {b}");
            }
            assert_eq!(s.row_len(r), prompts[r].len() + resp.len());
        }
    }
}

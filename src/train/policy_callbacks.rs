//! The trainer's side of the pipeline callbacks, on a [`Llama`] policy: token log-probs for
//! SAR ([`PolicyLogProbs`]) and reference responses for PAR/LSC ([`PolicyReferenceSampler`]).
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::model::batch;
use crate::model::{Llama, Tokenizer};
use crate::reward::pipeline::{
    GroupContext, LogProbProvider, LogProbRequest, ReferenceProvider, ResponseContext,
};
use crate::rollout::{generate, SamplingParams};

/// Token log-probs of responses under `model` at `temperature` (use the rollout temperature so
/// that SAR's two passes compare like with like). An empty prompt is just BOS.
pub struct PolicyLogProbs<'a> {
    pub model: &'a Llama,
    pub tok: &'a Tokenizer,
    pub temperature: f64,
}

impl LogProbProvider for PolicyLogProbs<'_> {
    fn logprobs(&mut self, requests: &[LogProbRequest<'_>]) -> Result<Vec<Vec<f64>>> {
        if requests.is_empty() {
            return Ok(vec![]);
        }
        let mut prompts = Vec::with_capacity(requests.len());
        let mut responses = Vec::with_capacity(requests.len());
        for r in requests {
            let mut p = self.tok.encode_with_bos(r.prompt)?;
            if p.is_empty() {
                // A tokenizer without BOS still needs one token to condition on.
                p.push(self.tok.eos);
            }
            prompts.push(p);
            let mut ids = self.tok.encode(r.response)?;
            if r.finished {
                ids.push(self.tok.eos);
            }
            responses.push(ids);
        }
        let b = batch::build(&prompts, &responses, self.tok.pad, self.model.device())?;
        let (lp, _) = batch::response_logprobs(self.model, &b, self.temperature)?;
        let rows = batch::to_f64_rows(&lp.detach())?;
        Ok(rows
            .into_iter()
            .zip(&responses)
            .map(|(row, resp)| row[..resp.len()].to_vec())
            .collect())
    }
}

/// Samples reference responses from a frozen reference policy (e.g. the model at the end of
/// warm-up), with its own RNG so the policy's sampling stream is untouched.
pub struct PolicyReferenceSampler<'a> {
    pub model: &'a Llama,
    pub tok: &'a Tokenizer,
    pub params: SamplingParams,
    pub rng: &'a mut ChaCha8Rng,
}

impl ReferenceProvider for PolicyReferenceSampler<'_> {
    fn reference_responses(
        &mut self,
        ctx: &GroupContext,
        m: usize,
    ) -> Result<Vec<ResponseContext>> {
        let ids = self.tok.encode_with_bos(&ctx.prompt)?;
        let prompts = vec![ids; m];
        let gens = generate(
            self.model,
            &prompts,
            self.tok.eos,
            self.tok.pad,
            &self.params,
            self.rng,
        )?;
        gens.into_iter()
            .map(|g| {
                let body: Vec<u32> = g
                    .tokens
                    .iter()
                    .copied()
                    .filter(|&t| t != self.tok.eos)
                    .collect();
                Ok(ResponseContext {
                    text: self.tok.decode(&body)?,
                    finished: g.finished,
                    num_tokens: g.tokens.len(),
                    token_logprobs: Some(g.logprobs.iter().map(|&x| x as f64).collect()),
                    ..Default::default()
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;
    use crate::reward::pipeline::{
        ComponentConfig, ComponentKind, PipelineConfig, Providers, RewardPipeline, VerifierCheck,
    };
    use crate::reward::sar::self_aligned_reward;
    use crate::reward::shaping::ShapingConfig;
    use candle_core::Device;
    use rand::SeedableRng;

    fn tiny() -> (Llama, Tokenizer) {
        let tok = Tokenizer::builtin_arithmetic();
        let mut cfg = Config::builtin_tiny(tok.vocab_size());
        cfg.hidden_size = 32;
        cfg.intermediate_size = 48;
        (Llama::init(&cfg, 4, &Device::Cpu).unwrap(), tok)
    }

    #[test]
    fn logprobs_match_a_single_sequence_forward_and_feed_sar() {
        let (model, tok) = tiny();
        let mut lp = PolicyLogProbs {
            model: &model,
            tok: &tok,
            temperature: 1.0,
        };
        let reqs = [
            LogProbRequest {
                prompt: "37+48=",
                response: "85",
                finished: true,
            },
            LogProbRequest {
                prompt: "",
                response: "85",
                finished: true,
            },
            LogProbRequest {
                prompt: "1+1=",
                response: "2",
                finished: false,
            },
        ];
        let batched = lp.logprobs(&reqs).unwrap();
        // Lengths: "85"+EOS = 3, "85"+EOS = 3, "2" = 1.
        assert_eq!(
            batched.iter().map(|v| v.len()).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        for (i, r) in reqs.iter().enumerate() {
            let alone = lp.logprobs(std::slice::from_ref(r)).unwrap();
            for (a, b) in alone[0].iter().zip(&batched[i]) {
                assert!((a - b).abs() < 1e-4, "request {i}: {a} vs {b}");
            }
            assert!(batched[i].iter().all(|&x| x < 0.0 && x.is_finite()));
        }
        // The pipeline's SAR value equals the formula on these log-probs.
        let mut p = RewardPipeline::new(PipelineConfig::new(vec![ComponentConfig::new(
            "sar",
            ComponentKind::Sar {},
        )
        .weighted(1.0)]))
        .unwrap();
        let ctx = GroupContext {
            prompt: "37+48=".into(),
            references: vec![],
            metadata: serde_json::Value::Null,
        };
        let resp = ResponseContext {
            text: "85".into(),
            finished: true,
            num_tokens: 3,
            ..Default::default()
        };
        let out = p
            .score_group_with(
                &ctx,
                &[resp],
                &mut Providers {
                    logprobs: Some(&mut lp),
                    references: None,
                },
            )
            .unwrap();
        let expected = self_aligned_reward(&batched[0], &batched[1]).unwrap();
        assert!(
            (out.rewards[0] - expected).abs() < 1e-5,
            "{} vs {expected}",
            out.rewards[0]
        );
    }

    #[test]
    fn reference_sampler_feeds_par_once_per_prompt() {
        let (model, tok) = tiny();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut sampler = PolicyReferenceSampler {
            model: &model,
            tok: &tok,
            params: SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens: 3,
            },
            rng: &mut rng,
        };
        let ctx = GroupContext {
            prompt: "2+2=".into(),
            references: vec!["4".into()],
            metadata: serde_json::Value::Null,
        };
        let refs = sampler.reference_responses(&ctx, 4).unwrap();
        assert_eq!(refs.len(), 4);
        for r in &refs {
            assert!(r.num_tokens >= 1 && r.num_tokens <= 3);
            assert_eq!(r.token_logprobs.as_ref().unwrap().len(), r.num_tokens);
        }
        let cfg = PipelineConfig {
            shaping: ShapingConfig::Par,
            reference_samples: 4,
            ..PipelineConfig::new(vec![ComponentConfig::new(
                "correct",
                ComponentKind::Verifier {
                    check: VerifierCheck::Exact,
                },
            )])
        };
        let mut p = RewardPipeline::new(cfg).unwrap();
        let responses = [ResponseContext {
            text: "4".into(),
            finished: true,
            num_tokens: 2,
            ..Default::default()
        }];
        for expect_hit in [false, true] {
            let out = p
                .score_group_with(
                    &ctx,
                    &responses,
                    &mut Providers {
                        references: Some(&mut sampler),
                        logprobs: None,
                    },
                )
                .unwrap();
            assert_eq!(out.reference_cache_hit, Some(expect_hit));
            // PAR of a reward 1 against references in {0, 1} lies in [σ(0), σ(1)] = [0.5, 0.731].
            assert!(
                out.rewards[0] >= 0.5 && out.rewards[0] <= 0.731_058_6,
                "{}",
                out.rewards[0]
            );
        }
    }
}

//! A trained reward model as a pipeline component (`kind = "reward-model"`).
//!
//! The value of a response is the model's scalar score of `[BOS] prompt response [EOS]`, the
//! EOS present only when the response finished (the layout `grove rm-train` trains on), see
//! [`crate::model::reward_model::rm_tokens`]. Responses are scored in batches of `batch_size`.
use std::path::Path;

use candle_core::Device;

use crate::error::{Error, Result};
use crate::model::reward_model::{rm_tokens, Padding};
use crate::reward::context::ResponseContext;
use crate::reward::rm_train::{load_reward_model, LoadedRewardModel};

pub struct RewardModelScorer {
    rm: LoadedRewardModel,
    batch_size: usize,
    truncated_score: Option<f64>,
}

impl RewardModelScorer {
    pub fn new(rm: LoadedRewardModel, batch_size: usize, truncated_score: Option<f64>) -> Self {
        RewardModelScorer {
            rm,
            batch_size: batch_size.max(1),
            truncated_score,
        }
    }

    /// Loads a folder written by `grove rm-train`.
    pub fn load(
        dir: &Path,
        batch_size: usize,
        truncated_score: Option<f64>,
        dev: &Device,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::checkpoint(
                dir,
                "reward model folder does not exist (train one with `grove rm-train`)",
            ));
        }
        Ok(Self::new(
            load_reward_model(dir, dev)?,
            batch_size,
            truncated_score,
        ))
    }

    /// Scores of `(prompt, text)` pairs, finished or not.
    pub fn score_texts(&self, items: &[(&str, &str, bool)]) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.batch_size) {
            let seqs = chunk
                .iter()
                .map(|(p, r, f)| rm_tokens(&self.rm.tok, p, r, *f))
                .collect::<Result<Vec<_>>>()?;
            out.extend(
                self.rm
                    .model
                    .score_tokens(&seqs, self.rm.tok.pad, Padding::Right)?,
            );
        }
        Ok(out)
    }

    /// The component's values for a group.
    pub fn score(&self, prompt: &str, responses: &[ResponseContext]) -> Result<Vec<f64>> {
        let scored: Vec<usize> = (0..responses.len())
            .filter(|&i| responses[i].finished || self.truncated_score.is_none())
            .collect();
        let items: Vec<(&str, &str, bool)> = scored
            .iter()
            .map(|&i| (prompt, responses[i].text.as_str(), responses[i].finished))
            .collect();
        let scores = self.score_texts(&items)?;
        let mut out = vec![self.truncated_score.unwrap_or(0.0); responses.len()];
        for (&i, s) in scored.iter().zip(scores) {
            out[i] = s;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::reward_model::RewardModel;
    use crate::model::{Config, Tokenizer};
    use crate::reward::pipeline::{
        ComponentConfig, ComponentKind, GroupContext, PipelineConfig, RewardPipeline, VerifierCheck,
    };

    /// A small untrained reward model saved the way `grove rm-train` saves one.
    fn saved_rm(dir: &Path) {
        let tok = Tokenizer::builtin_arithmetic();
        let mut cfg = Config::builtin_tiny(tok.vocab_size());
        cfg.hidden_size = 16;
        cfg.intermediate_size = 16;
        let rm = RewardModel::init(&cfg, 9, &Device::Cpu).unwrap();
        // Larger weights so that different texts get visibly different scores.
        for (_, v) in rm.params() {
            if v.as_tensor().dims().len() == 2 {
                v.set(&(v.as_tensor() * 30.0).unwrap()).unwrap();
            }
        }
        rm.save(dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tok.to_json()).unwrap();
    }

    #[test]
    fn reward_model_component_scores_like_the_model() {
        let dir = tempfile::tempdir().unwrap();
        saved_rm(dir.path());
        let scorer = RewardModelScorer::load(dir.path(), 2, None, &Device::Cpu).unwrap();
        // Batches of 2 over 3 items give the same as one at a time.
        let items = [
            ("1+2=", "3", true),
            ("1+2=", "4", true),
            ("1+2=", "33", false),
        ];
        let all = scorer.score_texts(&items).unwrap();
        for (i, it) in items.iter().enumerate() {
            let one = scorer.score_texts(std::slice::from_ref(it)).unwrap()[0];
            assert!((one - all[i]).abs() < 1e-4, "{one} vs {}", all[i]);
        }
        assert!(
            (all[0] - all[1]).abs() > 1e-4,
            "scores should depend on the answer"
        );

        // As a pipeline component, with truncated responses given a fixed value and weight 2.
        let cfg = PipelineConfig::new(vec![
            ComponentConfig::new(
                "correct",
                ComponentKind::Verifier {
                    check: VerifierCheck::Exact,
                },
            )
            .weighted(0.0),
            ComponentConfig::new(
                "rm",
                ComponentKind::RewardModel {
                    path: dir.path().display().to_string(),
                    batch_size: 8,
                    truncated_score: Some(-5.0),
                },
            )
            .weighted(2.0),
        ]);
        let mut p = RewardPipeline::new(cfg).unwrap();
        let ctx = GroupContext {
            prompt: "1+2=".into(),
            references: vec!["3".into()],
            metadata: serde_json::Value::Null,
        };
        let rs = [
            ResponseContext {
                text: "3".into(),
                finished: true,
                num_tokens: 2,
                ..Default::default()
            },
            ResponseContext {
                text: "33".into(),
                finished: false,
                num_tokens: 2,
                ..Default::default()
            },
        ];
        let out = p.score_group(&ctx, &rs).unwrap();
        assert!((out.components[0]["rm"] - all[0]).abs() < 1e-4);
        assert_eq!(out.components[1]["rm"], -5.0);
        // reward = 0·correct + 2·rm
        assert!((out.rewards[0] - 2.0 * all[0]).abs() < 2e-4);
        assert_eq!(out.rewards[1], -10.0);
        // The verdicts still come from the verifier.
        assert_eq!((out.verdicts[0].score, out.verdicts[1].score), (1.0, 0.0));
    }

    #[test]
    fn missing_folder_is_named() {
        let e = RewardModelScorer::load(Path::new("/nonexistent/rm"), 8, None, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("/nonexistent/rm") && e.contains("rm-train"),
            "{e}"
        );
    }
}

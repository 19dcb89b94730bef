//! A reward model: the policy architecture with a scalar scoring head (docs/algorithms.md#reward-model-training).
//!
//! r(prompt, response) = w · h_last, with h_last the final-norm hidden state of the last real
//! token of the sequence and w the (1 × hidden) head. The token sequence is
//! `[BOS] prompt response [EOS if the response finished]`, see [`rm_tokens`].
//!
//! The same model is PPO's critic ([`RewardModel::token_values`]): the head applied to the
//! hidden state of every response position instead of the last one (verl's and OpenRLHF's
//! critic is such a token-classification head with one label on the policy's trunk).
//!
//! Checkpoints follow HF `LlamaForSequenceClassification`: the body's `model.*` tensors plus
//! `score.weight` of shape (1, hidden), no `lm_head`, and a `config.json` with
//! `architectures = ["LlamaForSequenceClassification"]`, `num_labels = 1`. The body keeps an
//! output layer only because [`Llama`] always has one; for an untied config a missing
//! `lm_head.weight` is filled with zeros on load (it never affects the score).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};
use crate::model::batch::SeqBatch;
use crate::model::io::{load_safetensors, save_safetensors};
use crate::model::{attention_mask, Config, Llama, Tokenizer};

/// Checkpoint key of the scoring head (HF `LlamaForSequenceClassification`).
pub const SCORE_KEY: &str = "score.weight";
/// Standard deviation of the head's initial weights (HF `initializer_range`).
pub const HEAD_INIT_STD: f32 = 0.02;

/// Where padding goes when sequences of different lengths share a batch. Both give the same
/// scores: positions count real tokens only and the mask hides padding keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Left,
    Right,
}

/// A batch ready for [`RewardModel::forward`].
pub struct ScoreBatch {
    pub ids: Tensor,
    pub pos: Tensor,
    pub mask: Tensor,
    /// Row-major index (row · t + column) of each sequence's last real token: (b,) u32.
    pub last: Tensor,
    pub batch: usize,
    pub width: usize,
}

/// Packs token sequences into one padded batch.
pub fn score_batch(
    seqs: &[Vec<u32>],
    pad: u32,
    padding: Padding,
    max_positions: usize,
    dev: &Device,
) -> Result<ScoreBatch> {
    if seqs.is_empty() {
        return Err(Error::Model("reward model: empty batch".into()));
    }
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        return Err(Error::Model(format!(
            "reward model: sequence {i} is empty, there is no last token to score"
        )));
    }
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    if t > max_positions {
        return Err(Error::Model(format!(
            "reward model: a sequence of {t} tokens exceeds max_position_embeddings {max_positions}"
        )));
    }
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut pos = Vec::with_capacity(b * t);
    let mut key_valid = Vec::with_capacity(b);
    let mut last = Vec::with_capacity(b);
    for (row, s) in seqs.iter().enumerate() {
        let npad = t - s.len();
        let real = 0..s.len() as u32;
        match padding {
            Padding::Left => {
                ids.extend(std::iter::repeat_n(pad, npad));
                ids.extend_from_slice(s);
                pos.extend(std::iter::repeat_n(0, npad));
                pos.extend(real);
                key_valid.push((0..t).map(|j| j >= npad).collect());
                last.push((row * t + t - 1) as u32);
            }
            Padding::Right => {
                ids.extend_from_slice(s);
                ids.extend(std::iter::repeat_n(pad, npad));
                pos.extend(real);
                pos.extend(std::iter::repeat_n(0, npad));
                key_valid.push((0..t).map(|j| j < s.len()).collect());
                last.push((row * t + s.len() - 1) as u32);
            }
        }
    }
    Ok(ScoreBatch {
        ids: Tensor::from_vec(ids, (b, t), dev)?,
        pos: Tensor::from_vec(pos, (b, t), dev)?,
        mask: attention_mask(&key_valid, 0, t, dev)?,
        last: Tensor::from_vec(last, b, dev)?,
        batch: b,
        width: t,
    })
}

/// The tokens a reward model scores: `[BOS] prompt response [EOS if finished]`.
pub fn rm_tokens(
    tok: &Tokenizer,
    prompt: &str,
    response: &str,
    finished: bool,
) -> Result<Vec<u32>> {
    let mut ids = tok.encode_with_bos(prompt)?;
    ids.extend(tok.encode(response)?);
    if finished {
        ids.push(tok.eos);
    }
    Ok(ids)
}

pub struct RewardModel {
    pub body: Llama,
    /// The scoring head, (1, hidden).
    pub head: Var,
}

impl RewardModel {
    /// A fresh reward model: body as [`Llama::init`], head N(0, 0.02²), both from `seed`.
    pub fn init(cfg: &Config, seed: u64, dev: &Device) -> Result<Self> {
        let body = Llama::init(cfg, seed, dev)?;
        Self::from_policy(body, seed)
    }

    /// A reward model on top of an existing body (e.g. the SFT policy), with a new head.
    pub fn from_policy(body: Llama, seed: u64) -> Result<Self> {
        let h = body.cfg.hidden_size;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(7);
        let normal = Normal::new(0.0f32, HEAD_INIT_STD).map_err(|e| Error::Model(e.to_string()))?;
        let w: Vec<f32> = (0..h).map(|_| normal.sample(&mut rng)).collect();
        let head = Var::from_tensor(&Tensor::from_vec(w, (1, h), body.device())?)?;
        Ok(RewardModel { body, head })
    }

    /// Builds the model from named tensors: the body's plus `score.weight` (1, hidden).
    pub fn from_tensors(
        cfg: &Config,
        mut tensors: HashMap<String, Tensor>,
        dev: &Device,
        source: &str,
    ) -> Result<Self> {
        let head = tensors.remove(SCORE_KEY).ok_or_else(|| {
            Error::checkpoint(
                source,
                format!(
                    "missing tensor `{SCORE_KEY}` (expected shape [1, {}]): not a reward model",
                    cfg.hidden_size
                ),
            )
        })?;
        if head.dims() != [1, cfg.hidden_size] {
            return Err(Error::checkpoint(
                source,
                format!(
                    "tensor `{SCORE_KEY}` has shape {:?}, expected [1, {}] (num_labels must be 1)",
                    head.dims(),
                    cfg.hidden_size
                ),
            ));
        }
        if !cfg.tied() && !tensors.contains_key("lm_head.weight") {
            // Sequence-classification checkpoints have no LM head; the body needs one slot.
            tensors.insert(
                "lm_head.weight".into(),
                Tensor::zeros((cfg.vocab_size, cfg.hidden_size), DType::F32, dev)?,
            );
        }
        let body = Llama::from_tensors(cfg, tensors, dev, source)?;
        let head = head.to_dtype(DType::F32)?.to_device(dev)?.contiguous()?;
        Ok(RewardModel {
            body,
            head: Var::from_tensor(&head)?,
        })
    }

    /// Trainable parameters: the body's, then `score.weight`.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut p = self.body.params().to_vec();
        p.push((SCORE_KEY.to_string(), self.head.clone()));
        p
    }

    /// Checkpoint tensors in HF sequence-classification naming (no `lm_head`).
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        let mut t = self.body.named_tensors();
        t.remove("lm_head.weight");
        t.insert(SCORE_KEY.to_string(), self.head.as_tensor().clone());
        t
    }

    /// Scores (b,) with gradient, from the hidden state at each sequence's last real token.
    pub fn forward(&self, batch: &ScoreBatch) -> Result<Tensor> {
        Ok(self.forward_with_hidden(batch)?.0)
    }

    /// Scores (b,) and the final-norm hidden states (b, t, hidden), both with gradient (the
    /// hidden states feed an auxiliary language-modelling term).
    pub fn forward_with_hidden(&self, batch: &ScoreBatch) -> Result<(Tensor, Tensor)> {
        let hidden = self
            .body
            .forward_hidden(&batch.ids, &batch.pos, &batch.mask, None)?;
        let h = self.body.cfg.hidden_size;
        let flat = hidden.reshape((batch.batch * batch.width, h))?;
        let last = flat.index_select(&batch.last, 0)?;
        let scores = last.matmul(&self.head.as_tensor().t()?)?.squeeze(1)?;
        Ok((scores, hidden))
    }

    /// The critic's values (b, r) with gradient: V(s_t) = w · h at the position that predicts
    /// response token t (column P − 1 + t of a [`crate::model::batch::build`] batch), i.e. the
    /// state of the context and the response before token t.
    pub fn token_values(&self, batch: &SeqBatch) -> Result<Tensor> {
        let hidden = self
            .body
            .forward_hidden(&batch.ids, &batch.pos, &batch.mask, None)?;
        let h = hidden.narrow(1, batch.prompt_len - 1, batch.resp_len)?;
        let (b, r, hs) = h.dims3()?;
        let flat = h.contiguous()?.reshape((b * r, hs))?;
        Ok(flat.matmul(&self.head.as_tensor().t()?)?.reshape((b, r))?)
    }

    /// Scores of token sequences, no gradient kept.
    pub fn score_tokens(&self, seqs: &[Vec<u32>], pad: u32, padding: Padding) -> Result<Vec<f64>> {
        let b = score_batch(
            seqs,
            pad,
            padding,
            self.body.cfg.max_positions(),
            self.body.device(),
        )?;
        let r = self.forward(&b)?.detach();
        Ok(r.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    /// Writes `config.json` (sequence-classification form) and `model.safetensors` to `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut cfg = serde_json::to_value(&self.body.cfg)?;
        cfg["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
        cfg["num_labels"] = serde_json::json!(1);
        let p = dir.join("config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&cfg)?).map_err(|e| Error::io(&p, e))?;
        save_safetensors(&self.named_tensors(), &dir.join("model.safetensors"))
    }

    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let p = dir.join("model.safetensors");
        let tensors = load_safetensors(&p, dev)?;
        Self::from_tensors(&cfg, tensors, dev, &p.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RewardModel {
        let mut cfg = Config::builtin_tiny(19);
        cfg.hidden_size = 16;
        cfg.intermediate_size = 24;
        cfg.num_attention_heads = 2;
        cfg.num_key_value_heads = Some(2);
        let m = RewardModel::init(&cfg, 3, &Device::Cpu).unwrap();
        // Larger weights than the init so that scores differ visibly between inputs.
        for (_, v) in m.params() {
            if v.as_tensor().dims().len() == 2 {
                v.set(&(v.as_tensor() * 20.0).unwrap()).unwrap();
            }
        }
        m
    }

    #[test]
    fn padding_side_does_not_change_scores() {
        let m = tiny();
        let seqs = vec![
            vec![1, 5, 6, 7, 2],
            vec![1, 9, 2],
            vec![1, 4, 4, 4, 4, 8, 2],
        ];
        let alone: Vec<f64> = seqs
            .iter()
            .map(|s| {
                m.score_tokens(std::slice::from_ref(s), 0, Padding::Right)
                    .unwrap()[0]
            })
            .collect();
        let right = m.score_tokens(&seqs, 0, Padding::Right).unwrap();
        let left = m.score_tokens(&seqs, 0, Padding::Left).unwrap();
        for i in 0..3 {
            assert!((alone[i] - right[i]).abs() < 1e-4, "{alone:?} vs {right:?}");
            assert!((alone[i] - left[i]).abs() < 1e-4, "{alone:?} vs {left:?}");
        }
        // Different inputs, different scores (the head reads the right position).
        assert!((alone[0] - alone[1]).abs() > 1e-3 && (alone[1] - alone[2]).abs() > 1e-3);
    }

    #[test]
    fn score_is_head_dot_last_hidden_state() {
        let m = tiny();
        let seq = vec![1u32, 5, 6, 7, 2];
        let b = score_batch(
            std::slice::from_ref(&seq),
            0,
            Padding::Right,
            64,
            &Device::Cpu,
        )
        .unwrap();
        let hidden = m
            .body
            .forward_hidden(&b.ids, &b.pos, &b.mask, None)
            .unwrap();
        let last: Vec<f32> = hidden.get(0).unwrap().get(4).unwrap().to_vec1().unwrap();
        let w: Vec<f32> = m.head.as_tensor().get(0).unwrap().to_vec1().unwrap();
        let dot: f64 = last.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum();
        let s = m.score_tokens(&[seq], 0, Padding::Right).unwrap()[0];
        assert!((s - dot).abs() < 1e-4 * dot.abs().max(1.0), "{s} vs {dot}");
    }

    #[test]
    fn gradient_reaches_body_and_head() {
        let m = tiny();
        let b = score_batch(
            &[vec![1, 5, 2], vec![1, 6, 6, 2]],
            0,
            Padding::Left,
            64,
            &Device::Cpu,
        )
        .unwrap();
        let grads = m
            .forward(&b)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in m.params() {
            if name == "lm_head.weight" {
                continue;
            }
            assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
        }
    }

    #[test]
    fn token_values_are_the_head_on_each_state_before_a_response_token() {
        let m = tiny();
        // Prompts of different lengths (left padding) and responses of different lengths.
        let prompts = vec![vec![1u32, 5, 6], vec![1, 9]];
        let responses = vec![vec![7u32, 8, 2], vec![4, 2]];
        let b = crate::model::batch::build(&prompts, &responses, 0, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.token_values(&b).unwrap().to_vec2().unwrap();
        assert_eq!((v.len(), v[0].len()), (2, 3));
        // V(s_t) equals the score of the sequence prompt + response[..t] alone: its last
        // token's hidden state is the state before response token t.
        for (i, (p, r)) in prompts.iter().zip(&responses).enumerate() {
            for t in 0..r.len() {
                let mut seq = p.clone();
                seq.extend_from_slice(&r[..t]);
                let alone = m.score_tokens(&[seq], 0, Padding::Right).unwrap()[0];
                assert!(
                    (alone - v[i][t] as f64).abs() < 1e-4 * alone.abs().max(1.0),
                    "row {i} token {t}: {alone} vs {}",
                    v[i][t]
                );
            }
        }
    }

    #[test]
    fn save_load_round_trip_uses_hf_names() {
        let m = tiny();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let tensors =
            load_safetensors(&dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(tensors[SCORE_KEY].dims(), &[1, 16]);
        assert!(!tensors.contains_key("lm_head.weight"));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
        assert_eq!(cfg["num_labels"], 1);
        let back = RewardModel::load(dir.path(), &Device::Cpu).unwrap();
        let seqs = vec![vec![1, 5, 6, 2], vec![1, 7, 2]];
        assert_eq!(
            m.score_tokens(&seqs, 0, Padding::Right).unwrap(),
            back.score_tokens(&seqs, 0, Padding::Right).unwrap()
        );
    }

    #[test]
    fn untied_body_and_bad_head_shapes() {
        let mut cfg = Config::builtin_tiny(11);
        cfg.hidden_size = 8;
        cfg.intermediate_size = 8;
        cfg.num_attention_heads = 2;
        cfg.num_key_value_heads = Some(2);
        cfg.tie_word_embeddings = Some(false);
        let m = RewardModel::init(&cfg, 1, &Device::Cpu).unwrap();
        let mut t = m.named_tensors();
        assert!(!t.contains_key("lm_head.weight"));
        // Loads without lm_head (filled with zeros).
        let back = RewardModel::from_tensors(&cfg, t.clone(), &Device::Cpu, "mem").unwrap();
        assert_eq!(
            m.score_tokens(&[vec![1, 2, 3]], 0, Padding::Right).unwrap(),
            back.score_tokens(&[vec![1, 2, 3]], 0, Padding::Right)
                .unwrap()
        );
        t.insert(
            SCORE_KEY.into(),
            Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = RewardModel::from_tensors(&cfg, t.clone(), &Device::Cpu, "two-labels")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("two-labels") && err.contains("num_labels"),
            "{err}"
        );
        t.remove(SCORE_KEY);
        let err = RewardModel::from_tensors(&cfg, t, &Device::Cpu, "policy.safetensors")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("score.weight") && err.contains("not a reward model"),
            "{err}"
        );
    }

    #[test]
    fn batch_errors_are_named() {
        let e = score_batch(&[vec![1], vec![]], 0, Padding::Right, 64, &Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("sequence 1 is empty"), "{e}");
        let e = score_batch(&[vec![1; 70]], 0, Padding::Right, 64, &Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("70 tokens"), "{e}");
        let tok = Tokenizer::builtin_arithmetic();
        let ids = rm_tokens(&tok, "1+2=", "3", true).unwrap();
        // <bos> 1 + 2 = 3 <eos>
        assert_eq!(ids.len(), 7);
        assert_eq!((ids[0], ids[6]), (tok.bos.unwrap(), tok.eos));
        assert_eq!(rm_tokens(&tok, "1+2=", "3", false).unwrap().len(), 6);
    }
}

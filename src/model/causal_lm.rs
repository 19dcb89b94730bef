//! What rollout and evaluation need from a decoder: hidden states with a KV cache, and logits.
//! Implemented by the trainable [`Llama`] and by the quantized
//! [`QuantizedLlama`](super::quantized::QuantizedLlama), so sampling code runs either.
use candle_core::{Device, Tensor};

use super::llama::{Config, KvCache, Llama};
use crate::error::Result;

pub trait CausalLm: Send + Sync {
    /// The model's shape (layers, heads, vocabulary, context length).
    fn config(&self) -> &Config;

    fn device(&self) -> &Device;

    /// Final-norm hidden states (b, t, hidden). `ids`, `pos`: (b, t) u32, positions absolute;
    /// `mask`: additive (b, 1, t, cached + t). With a cache, this call's keys/values are
    /// appended to it.
    fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// Logits (…, vocab) from hidden states (…, hidden).
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;

    /// An empty cache for this model.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.config().num_hidden_layers)
    }
}

impl CausalLm for Llama {
    fn config(&self) -> &Config {
        &self.cfg
    }

    fn device(&self) -> &Device {
        Llama::device(self)
    }

    fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Llama::forward_hidden(self, ids, pos, mask, cache)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Llama::logits(self, hidden)
    }
}

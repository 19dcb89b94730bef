//! The policy network (Llama/Qwen2 family), its tokenizer and checkpoint IO.
pub mod amx;
pub mod batch;
pub mod bf16;
pub mod causal_lm;
pub mod chat;
pub mod fused;
pub mod gguf;
pub mod hub;
pub mod io;
pub mod llama;
pub mod logprob;
pub mod lora;
pub mod quantized;
pub mod simd;

pub mod reward_model;
pub mod tokenizer;

pub use causal_lm::CausalLm;
pub use chat::ChatTemplate;
pub use llama::{attention_mask, Config, KvCache, Llama};
pub use quantized::QuantizedLlama;
pub use tokenizer::Tokenizer;

//! The policy network (Llama/Qwen2 family), its tokenizer and checkpoint IO.
pub mod gguf;
pub mod io;
pub mod llama;
pub mod reward_model;
pub mod tokenizer;

pub use llama::{attention_mask, Config, KvCache, Llama};
pub use tokenizer::Tokenizer;

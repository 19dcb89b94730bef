//! Models and tokenizers against independent references: the Llama and Qwen forward passes,
//! pretrained folders, GGUF files, tokenizer parity.
//!
//! One binary per group (each test binary links the whole crate), one module per topic.
#[path = "../common/mod.rs"]
mod common;
mod gguf_quantized;
mod lora;
mod model;
mod pretrained;
mod qwen3;
mod tokenizer_parity;

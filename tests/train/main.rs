//! Training runs end to end: exact resume, reward pipelines, explorer and learner processes,
//! remote rollouts, pretrained policies.
//!
//! One binary per group (each test binary links the whole crate), one module per topic.
mod blend;
#[path = "../common/mod.rs"]
mod common;
mod distributed;
mod dtype;
mod environments;
mod eva;
mod killed_server;
mod ppo;
mod pretrained_train;
mod remote;
mod remote_sync;
mod sampling;
mod train;
mod train_rewards;
mod vllm_sync;

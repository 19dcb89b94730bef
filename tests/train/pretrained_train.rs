//! `grove train` on real tasks with pretrained models: GSM8K with a tiny random GGUF Llama
//! (base prompts, its SentencePiece tokenizer), MATH-500 with a tiny HF folder carrying the GPT-2
//! tokenizer and a chat template. 1–2 RL steps each.
use std::path::Path;

use crate::common::quiet;
use grove::config;
use grove::model::io::{load_pretrained, save_pretrained};
use grove::model::{Config, Llama, Tokenizer};
use grove::reward::math::MathVerifier;
use grove::train::run;

const GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/models/llama-tiny-random-gguf/llama-2-tiny-random.gguf"
);
const GSM8K_TRAIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/gsm8k/train.jsonl"
);
const GSM8K_TEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/gsm8k/test.jsonl"
);
const MATH500: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/math500/test.jsonl"
);
const GPT2_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/models/gpt2-tiny-random/tokenizer.json"
);

fn lines(path: &Path) -> Vec<serde_json::Value> {
    grove::report::read_jsonl(path).unwrap()
}

fn without_timing(mut v: serde_json::Value) -> serde_json::Value {
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("timing/") && !k.starts_with("throughput/"));
    v
}

fn gsm8k_cfg(out: &Path, name: &str) -> config::ValidatedRun {
    config::load(
        None,
        &[
            format!("output_dir={:?}", out.display().to_string()),
            format!("name={name:?}"),
            format!("model.source={GGUF:?}"),
            "task.kind=\"gsm8k\"".into(),
            format!("task.train_data={GSM8K_TRAIN:?}"),
            format!("task.eval_data={GSM8K_TEST:?}"),
            "task.heldout_size=3".into(),
            "rollout.prompts_per_step=2".into(),
            "rollout.group_size=3".into(),
            "rollout.max_new_tokens=6".into(),
            // The reference solution as the last response of each group: a reward of 1 in every
            // group, so the update is not zero although a random model never solves GSM8K.
            "sampling.inject_ground_truth=true".into(),
            "train.steps=2".into(),
            "train.eval_every=1".into(),
            "train.checkpoint_every=1".into(),
            "train.lr=1e-2".into(),
            "train.lr_warmup_steps=0".into(),
            "train.log_samples=2".into(),
        ],
    )
    .unwrap()
}

#[test]
fn gsm8k_rl_steps_on_a_tiny_gguf_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run(gsm8k_cfg(tmp.path(), "a"), &quiet()).unwrap();
    assert_eq!((s.rl_steps_done, s.warmup_steps), (2, 0));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.run_dir.join("plan.json")).unwrap())
            .unwrap();
    assert_eq!(plan["warmup_max_steps"], 0);
    assert_eq!(plan["heldout_size"], 3);
    let metrics = lines(&s.run_dir.join("metrics.jsonl"));
    // No supervised warm-up for a pretrained model: only RL lines, steps 0, 1, 2.
    assert!(metrics.iter().all(|m| m["phase"] == "rl"));
    let steps: Vec<u64> = metrics
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 1, 2]);
    for m in &metrics[1..] {
        let r = m["reward/mean"].as_f64().unwrap();
        // 2 groups × 3: the injected reference scores 1, so the mean is at least 2/6.
        assert!((1.0 / 3.0 - 1e-9..=1.0).contains(&r), "{m}");
        assert!(m["grad/norm"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["acc/eval"].is_number());
    }

    // Samples: GSM8K base prompts; each sampled response's reward is the math verifier's.
    let gsm: Vec<serde_json::Value> = std::fs::read_to_string(GSM8K_TRAIN)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let samples = lines(&s.run_dir.join("samples.jsonl"));
    assert_eq!(samples.len(), 4); // 2 steps × log_samples 2
    let verifier = MathVerifier::default();
    for smp in &samples {
        let prompt = smp["prompt"].as_str().unwrap();
        assert!(
            prompt.starts_with("Solve the problem. End with \"#### <answer>\".\n\nQuestion: "),
            "{prompt}"
        );
        let q = prompt
            .trim_start_matches("Solve the problem. End with \"#### <answer>\".\n\nQuestion: ")
            .trim_end_matches("\nAnswer:");
        let row = gsm
            .iter()
            .find(|r| r["question"].as_str().unwrap().trim() == q)
            .expect("prompt is a GSM8K training question");
        let answer = smp["answer"].as_str().unwrap();
        assert!(row["answer"]
            .as_str()
            .unwrap()
            .ends_with(&format!("#### {answer}")));
        let mut injected = 0;
        for r in smp["responses"].as_array().unwrap() {
            if r["ground_truth"] == true {
                // The worked solution, calculator annotations removed, ending in its answer.
                let text = r["text"].as_str().unwrap();
                assert!(
                    text.trim_end().ends_with(&format!("#### {answer}")) && !text.contains("<<"),
                    "{text}"
                );
                assert!(text.len() > answer.len() + 10, "{text}");
                assert_eq!(verifier.verify(text, answer).score, 1.0, "{text}");
                injected += 1;
                continue;
            }
            let mut text = r["text"].as_str().unwrap();
            if let Some(cut) = text.find("\nQuestion:") {
                text = &text[..cut];
            }
            assert_eq!(
                r["reward"].as_f64().unwrap(),
                verifier.verify(text, answer).score
            );
        }
        assert_eq!(injected, 1, "one injected reference per group");
    }

    // The checkpoint is a loadable model with the GGUF's tokenizer, and training moved it.
    let ck = s.run_dir.join("checkpoints/step-2");
    let (trained, tok) = load_pretrained(&ck, &candle_core::Device::Cpu).unwrap();
    let (orig, orig_tok) = load_pretrained(Path::new(GGUF), &candle_core::Device::Cpu).unwrap();
    assert_eq!(tok.vocab_size(), orig_tok.vocab_size());
    assert_eq!(tok.eos, orig_tok.eos);
    let moved = trained
        .params()
        .iter()
        .zip(orig.params())
        .any(|((_, a), (_, b))| {
            let d = (a.as_tensor() - b.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            d > 0.0
        });
    assert!(moved, "no parameter changed in 2 RL steps");

    // The same config and seed give the same run (prompt draws, samples, updates).
    let again = run(gsm8k_cfg(tmp.path(), "b"), &quiet()).unwrap();
    let a: Vec<_> = metrics.into_iter().map(without_timing).collect();
    let b: Vec<_> = lines(&again.run_dir.join("metrics.jsonl"))
        .into_iter()
        .map(without_timing)
        .collect();
    assert_eq!(a, b);
}

#[test]
fn math500_with_a_chat_template_and_a_checkpoint_that_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    // A tiny random Llama over the real GPT-2 vocabulary, saved as an HF folder with a chat
    // template in its tokenizer_config.json.
    let json = std::fs::read_to_string(GPT2_TOKENIZER).unwrap();
    let mut tok = Tokenizer::from_json(json, "gpt2", None, "<|endoftext|>", None).unwrap();
    let template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}\
                    {% if add_generation_prompt %}<|assistant|>\n{% endif %}";
    tok.chat_template = Some(template.into());
    let mut shape = Config::builtin_tiny(tok.vocab_size());
    shape.hidden_size = 8;
    shape.intermediate_size = 16;
    shape.num_hidden_layers = 1;
    shape.num_attention_heads = 2;
    shape.num_key_value_heads = Some(2);
    shape.max_position_embeddings = Some(1024);
    let model = Llama::init(&shape, 1, &candle_core::Device::Cpu).unwrap();
    let folder = tmp.path().join("tiny-chat");
    save_pretrained(&model, &tok, &folder).unwrap();

    let cfg = config::load(
        None,
        &[
            format!("output_dir={:?}", tmp.path().display().to_string()),
            format!("model.source={:?}", folder.display().to_string()),
            "task.kind=\"math500\"".into(),
            format!("task.eval_data={MATH500:?}"),
            "task.heldout_size=2".into(),
            "rollout.prompts_per_step=2".into(),
            "rollout.group_size=2".into(),
            "rollout.max_new_tokens=4".into(),
            "train.steps=1".into(),
            "train.checkpoint_every=1".into(),
            "train.log_samples=1".into(),
        ],
    )
    .unwrap();
    let s = run(cfg, &quiet()).unwrap();
    assert_eq!(s.rl_steps_done, 1);
    let smp = &lines(&s.run_dir.join("samples.jsonl"))[0];
    let prompt = smp["prompt"].as_str().unwrap();
    assert!(prompt.starts_with("<|user|>\n"), "{prompt}");
    assert!(
        prompt.ends_with("within \\boxed{}.\n<|assistant|>\n"),
        "{prompt}"
    );
    // MATH-500 has one file: the 2 held-out rows never appear as training prompts.
    let first_two: Vec<String> = std::fs::read_to_string(MATH500)
        .unwrap()
        .lines()
        .take(2)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["problem"].as_str().unwrap().trim().to_string()
        })
        .collect();
    assert!(first_two.iter().all(|q| !prompt.contains(q.as_str())));
    // The checkpoint keeps the chat template, so evaluating it builds the same prompts.
    let ck = s.run_dir.join("checkpoints/step-1");
    assert!(ck.join("tokenizer_config.json").is_file());
    let (_, back) = load_pretrained(&ck, &candle_core::Device::Cpu).unwrap();
    assert_eq!(back.chat_template.as_deref(), Some(template));
    assert_eq!(back.bos, None);
}

#[test]
fn dataset_tasks_need_a_pretrained_model() {
    let e = config::load(None, &["task.kind=\"gsm8k\"".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("task.kind = \"gsm8k\" needs a pretrained model") && e.contains("model.source"),
        "{e}"
    );
}

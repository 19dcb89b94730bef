//! eva's creator loop beyond the built-in arithmetic: countdown puzzles evolved by the
//! countdown mutator (saved with checkpoints, resumed exactly), and a text dataset whose
//! prompts the policy itself rewrites, scored by a reward that needs no reference.
use std::path::Path;

use crate::common::{quiet, rl_lines};
use grove::config;
use grove::env::countdown_eva::Puzzle;
use grove::model::io::save_pretrained;
use grove::model::{Config, Llama, Tokenizer};
use grove::task::Problem;
use grove::train::{run, TrainOptions};

fn countdown(out: &Path, steps: usize) -> config::ValidatedRun {
    let sets: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        "env.kind=\"countdown\"".into(),
        "env.countdown_numbers=3".into(),
        "env.countdown_max_number=9".into(),
        "env.countdown_max_target=30".into(),
        "env.countdown_prompt=\"short\"".into(),
        "env.heldout_size=8".into(),
        "env.max_tokens=64".into(),
        "warmup.max_steps=4".into(),
        "warmup.eval_every=2".into(),
        "warmup.eval_size=4".into(),
        "rollout.prompts_per_step=4".into(),
        "rollout.group_size=4".into(),
        "rollout.max_new_tokens=8".into(),
        format!("train.steps={steps}"),
        "train.eval_every=2".into(),
        "train.checkpoint_every=1".into(),
        "train.log_samples=4".into(),
        "sampling.eva.pool_size=8".into(),
        "sampling.eva.every=2".into(),
        "sampling.eva.children=3".into(),
    ];
    config::load(None, &sets).unwrap()
}

fn resume(run_dir: &Path) -> grove::train::Summary {
    let cfg = config::load_for(
        Some(&run_dir.join("config.toml")),
        &[],
        config::Purpose::Resume,
    )
    .unwrap();
    run(
        cfg,
        &TrainOptions {
            quiet: true,
            resume: Some(run_dir.to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn stopped_after(cfg: config::ValidatedRun, steps: usize) -> grove::train::Summary {
    run(
        cfg,
        &TrainOptions {
            quiet: true,
            stop_after: Some(steps),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The saved pool of a checkpoint: (prompt, answer, round, question) of each prompt.
fn saved_pool(run_dir: &Path, step: usize) -> Vec<serde_json::Value> {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join(format!("checkpoints/step-{step}/state.json")))
            .unwrap(),
    )
    .unwrap();
    state["explore"]["eva"]["prompts"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn eva_evolves_countdown_puzzles_saves_them_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let a = run(countdown(&tmp.path().join("a"), 5), &quiet()).unwrap();
    let lines = rl_lines(&a.run_dir);
    assert_eq!(lines.len(), 6);
    let mut pool = 8.0;
    for (s, line) in lines.iter().enumerate().skip(1) {
        let m = |k: &str| {
            line[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k} at step {s}"))
        };
        pool += m("eva/added");
        assert_eq!(m("eva/pool_size"), pool, "step {s}");
        let attempted = m("eva/mutations_attempted");
        // rounds after steps 2 and 4: ⌈0.25 · seen⌉ prompts × 3 children
        assert_eq!(attempted > 0.0, s % 2 == 0, "step {s}: {line}");
        assert_eq!(attempted % 3.0, 0.0);
        assert!(m("eva/mutations_accepted") <= attempted);
        assert!(m("eva/added") <= m("eva/mutations_accepted"));
        assert_eq!(m("eva/mutations_rejected"), 0.0);
    }
    assert!(pool > 8.0, "no puzzle was ever added");
    // Every saved puzzle is solved by its own reference play (the environment's check).
    let saved = saved_pool(&a.run_dir, 4);
    assert_eq!(
        saved.len() as f64,
        lines[4]["eva/pool_size"].as_f64().unwrap()
    );
    for p in &saved {
        let problem: Problem = serde_json::from_value(p["problem"].clone()).unwrap();
        let puzzle = Puzzle::from_problem(&problem).unwrap();
        assert_eq!(puzzle.check(&puzzle.solution), Ok(()), "{p}");
        assert_eq!(puzzle.numbers.len(), 3);
        assert!((10..=30).contains(&puzzle.target), "{p}");
    }
    assert!(saved.iter().any(|p| p["round"] == 1));
    // The episodes of steps 1-4 play puzzles of that pool, asked in the short wording.
    let samples = grove::report::read_jsonl(&a.run_dir.join("samples.jsonl")).unwrap();
    let mut checked = 0;
    for g in samples.iter().filter(|g| g["phase"] == "rl") {
        if g["step"].as_u64().unwrap() > 4 {
            continue;
        }
        let asked = g["responses"][0]["episode"]["messages"][0]["content"]
            .as_str()
            .unwrap();
        assert!(
            saved.iter().any(|p| p["problem"]["prompt"] == asked),
            "{asked} is not in the saved pool"
        );
        checked += 1;
    }
    assert!(checked > 0);
    // Stopped after 3 steps and resumed: the same metrics and the same final weights.
    let b = stopped_after(countdown(&tmp.path().join("b"), 5), 3);
    assert_eq!(b.rl_steps_done, 3);
    resume(&b.run_dir);
    assert_eq!(lines, rl_lines(&b.run_dir), "resumed run differs");
    let last = "checkpoints/step-5/model.safetensors";
    assert!(
        std::fs::read(a.run_dir.join(last)).unwrap()
            == std::fs::read(b.run_dir.join(last)).unwrap(),
        "final weights differ"
    );
    // Other environments are refused with the reason.
    let e = config::load(
        None,
        &[
            "env.kind=\"guess\"".into(),
            "sampling.eva.pool_size=8".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sampling.eva") && e.contains("countdown"), "{e}");
}

/// A tiny random Llama over the built-in text characters (so that about one token in 60 is
/// EOS and generations end), saved as an HF folder with a chat template.
fn tiny_chat_model(dir: &Path) -> std::path::PathBuf {
    let mut tok = Tokenizer::builtin_text();
    tok.chat_template = Some(
        "{% for m in messages %}<{{ m.role }}>\n{{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}<assistant>\n{% endif %}"
            .into(),
    );
    let mut shape = Config::builtin_tiny(tok.vocab_size());
    shape.max_position_embeddings = Some(512);
    let model = Llama::init(&shape, 1, &candle_core::Device::Cpu).unwrap();
    let folder = dir.join("tiny-chat");
    save_pretrained(&model, &tok, &folder).unwrap();
    folder
}

fn text_run(dir: &Path, model: &Path, extra: &[&str]) -> Vec<String> {
    let rows = |qs: &[(&str, &str)]| -> String {
        qs.iter()
            .map(|(q, a)| format!("{{\"prompt\": \"{q}\", \"answer\": \"{a}\"}}\n"))
            .collect()
    };
    let train = dir.join("train.jsonl");
    std::fs::write(
        &train,
        rows(&[
            ("what is one plus two?", "3"),
            ("what is two times four?", "8"),
            ("name a color.", "red"),
            ("count to three.", "1 2 3"),
            ("what is ten minus one?", "9"),
            ("spell cat.", "c a t"),
        ]),
    )
    .unwrap();
    let eval = dir.join("eval.jsonl");
    std::fs::write(&eval, rows(&[("what is six?", "6"), ("say hi.", "hi")])).unwrap();
    // A reward that needs no reference: the response's length, odd or even.
    let script = dir.join("parity.py");
    std::fs::write(
        &script,
        "import json, sys\nfor line in sys.stdin:\n    r = json.loads(line)\n    \
         print(json.dumps({\"reward\": float(len(r[\"response\"]) % 2)}), flush=True)\n",
    )
    .unwrap();
    let mut sets: Vec<String> = vec![
        format!("output_dir={:?}", dir.join("runs").display().to_string()),
        format!("model.source={:?}", model.display().to_string()),
        "task.kind=\"dataset\"".into(),
        format!("task.path={:?}", train.display().to_string()),
        format!("task.eval_path={:?}", eval.display().to_string()),
        "task.heldout_size=2".into(),
        "task.reward=\"external\"".into(),
        format!(
            "task.external={{command=[\"python3\", {:?}]}}",
            script.display().to_string()
        ),
        "warmup.max_steps=0".into(),
        "rollout.prompts_per_step=2".into(),
        "rollout.group_size=3".into(),
        "rollout.max_new_tokens=6".into(),
        "train.steps=4".into(),
        "train.eval_every=4".into(),
        "train.checkpoint_every=1".into(),
        "train.log_samples=2".into(),
        "sampling.eva.pool_size=4".into(),
        "sampling.eva.every=1".into(),
        "sampling.eva.children=3".into(),
        "sampling.eva.generator_template=\"write a harder variant of: {prompt}\"".into(),
        "sampling.eva.generator_max_tokens=48".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

#[test]
fn eva_rewrites_text_prompts_with_the_policy_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let sets = text_run(tmp.path(), &model, &["name=\"a\""]);
    let a = run(config::load(None, &sets).unwrap(), &quiet()).unwrap();
    let lines = rl_lines(&a.run_dir);
    let (mut accepted, mut rejected) = (0.0, 0.0);
    for (s, line) in lines.iter().enumerate().skip(1) {
        let m = |k: &str| {
            line[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k} at step {s}"))
        };
        // every generation is either a new prompt or rejected as degenerate
        assert_eq!(
            m("eva/mutations_attempted"),
            m("eva/mutations_accepted") + m("eva/mutations_rejected"),
            "step {s}: {line}"
        );
        assert!(m("eva/mutations_attempted") >= 3.0);
        accepted += m("eva/mutations_accepted");
        rejected += m("eva/mutations_rejected");
    }
    assert!(accepted > 0.0 && rejected > 0.0, "{accepted} {rejected}");
    // The evolved prompts: the parent's chat prompt with the generated question in place of
    // the parent's, no reference answer, the question kept for the next rounds.
    let saved = saved_pool(&a.run_dir, 4);
    let evolved: Vec<_> = saved.iter().filter(|p| p["round"] != 0).collect();
    assert_eq!(
        evolved.len() as f64,
        lines[4]["eva/evolved"].as_f64().unwrap()
    );
    assert!(!evolved.is_empty());
    for p in &evolved {
        let q = p["question"].as_str().unwrap();
        let prompt = p["problem"]["prompt"].as_str().unwrap();
        assert_eq!(prompt, format!("<user>\n{q}\n<assistant>\n"), "{p}");
        assert_eq!(p["problem"]["answer"], "");
        assert!(!q.is_empty());
    }
    for p in saved.iter().filter(|p| p["round"] == 0) {
        let q = p["question"].as_str().unwrap();
        assert!(q.starts_with("what is") || q.ends_with('.'), "{p}");
    }
    // Stopped after 2 steps and resumed: the same run (the evolved prompts and their
    // questions come back from the checkpoint).
    let b_sets = text_run(tmp.path(), &model, &["name=\"b\""]);
    let b = stopped_after(config::load(None, &b_sets).unwrap(), 2);
    resume(&b.run_dir);
    assert_eq!(lines, rl_lines(&b.run_dir), "resumed run differs");
    // A second model named by sampling.eva.generator writes them instead (here the same
    // folder: the first round, before any update, gives the same prompts).
    let c_sets = text_run(
        tmp.path(),
        &model,
        &[
            "name=\"c\"",
            &format!("sampling.eva.generator={:?}", model.display().to_string()),
            "train.steps=1",
        ],
    );
    let c = run(config::load(None, &c_sets).unwrap(), &quiet()).unwrap();
    assert_eq!(rl_lines(&c.run_dir)[1]["eva/added"], lines[1]["eva/added"]);
    assert_eq!(saved_pool(&c.run_dir, 1), saved_pool(&a.run_dir, 1));
}

#[test]
fn eva_on_text_refuses_rewards_that_need_a_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_chat_model(tmp.path());
    let mut sets = text_run(tmp.path(), &model, &[]);
    sets.retain(|s| !s.starts_with("task.external"));
    sets.push("task.reward=\"exact\"".into());
    let e = config::load(None, &sets).unwrap_err().to_string();
    assert!(
        e.contains("task.reward = \"exact\"")
            && e.contains("\"external\"")
            && e.contains("no reference"),
        "{e}"
    );
    // A fixed pool keeps the references and works with any reward.
    sets.push("sampling.eva.every=0".into());
    config::load(None, &sets).unwrap();
    // A missing generator model names the key before any step.
    let mut sets = text_run(
        tmp.path(),
        &model,
        &["sampling.eva.generator=\"no/such/model\""],
    );
    sets.push("name=\"missing\"".into());
    let e = config::load(None, &sets).unwrap_err().to_string();
    assert!(
        e.contains("sampling.eva.generator") && e.contains("no/such/model"),
        "{e}"
    );
}

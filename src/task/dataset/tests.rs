use std::path::Path;

use rand::SeedableRng;

use super::*;
use crate::reward::math::MathVerifier;

fn data(rel: &str) -> String {
    format!("{}/../shared/data/{rel}", env!("CARGO_MANIFEST_DIR"))
}

fn gpt2() -> Tokenizer {
    let path = data("models/gpt2-tiny-random/tokenizer.json");
    Tokenizer::from_file(Path::new(&path), None, "<|endoftext|>", None).unwrap()
}

/// GPT-2's tokenizer with a small chat template: `<|role|>content\n` per message.
fn chat_gpt2() -> Tokenizer {
    let mut tok = gpt2();
    tok.chat_template = Some(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}<|assistant|>{% endif %}"
            .into(),
    );
    tok
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A dataset config on `path` with the given fields and reward.
fn cfg(path: &str, prompt: &str, answer: &str, reward: &str) -> TaskConfig {
    TaskConfig {
        kind: TaskKind::Dataset,
        path: Some(path.into()),
        prompt_field: Some(prompt.into()),
        answer_field: Some(answer.into()),
        reward: Some(reward.into()),
        split_seed: Some(7),
        ..Default::default()
    }
}

/// 20 rows `{"q": {"text": "a+b="}, "sol": "c"}` in the built-in vocabulary.
fn sums_jsonl() -> String {
    (0..20)
        .map(|i| {
            format!(
                "{{\"q\": {{\"text\": \"{i}+{i}=\"}}, \"sol\": \"{}\"}}\n",
                2 * i
            )
        })
        .collect()
}

fn err(cfg: &TaskConfig, tok: &Tokenizer) -> String {
    DatasetTask::new(cfg, tok, "m").err().unwrap().to_string()
}

#[test]
fn nested_fields_and_a_seeded_disjoint_fraction_split() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", &sums_jsonl());
    let tok = Tokenizer::builtin_arithmetic();
    let c = cfg(&path, "q.text", "sol", "exact");
    let task = DatasetTask::new(&c, &tok, "the built-in model").unwrap();
    assert_eq!(task.style, PromptStyle::Base);
    // The default fraction 0.1 of 20 rows: 2 held out, 18 for training, no prompt in both.
    assert_eq!((task.heldout().len(), task.train_len()), (2, 18));
    let train: std::collections::HashSet<_> =
        task.train_problems().iter().map(|p| &p.prompt).collect();
    assert!(task.heldout().iter().all(|h| !train.contains(&h.prompt)));
    for p in task.train_problems().iter().chain(task.heldout()) {
        let i: u32 = p.prompt.split('+').next().unwrap().parse().unwrap();
        assert_eq!(p.answer, (2 * i).to_string());
        assert_eq!(p.prompt, format!("{i}+{i}="));
    }
    // Same seed, same split; another seed, another split (of the same size).
    let again = DatasetTask::new(&c, &tok, "m").unwrap();
    assert_eq!(again.heldout(), task.heldout());
    let other = DatasetTask::new(
        &TaskConfig {
            split_seed: Some(8),
            eval_fraction: Some(0.25),
            ..c.clone()
        },
        &tok,
        "m",
    )
    .unwrap();
    assert_eq!(other.heldout().len(), 5);
    // Scoring is the named reward: exact match after trimming, ended with EOS.
    assert_eq!(task.score("", " 4 ", true, "4").unwrap().score, 1.0);
    assert_eq!(task.score("", "4", false, "4").unwrap().score, 0.0);
    assert!(task.prompt_bos());
}

#[test]
fn fraction_split_follows_ids_not_positions() {
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    let held = fraction_split(&keys, 0.3, 1);
    assert_eq!(held.iter().filter(|h| **h).count(), 3);
    let picked: Vec<&str> = keys
        .iter()
        .zip(&held)
        .filter(|x| *x.1)
        .map(|x| *x.0)
        .collect();
    // Reversed file order: the same ids are held out.
    let rev: Vec<&str> = keys.iter().rev().copied().collect();
    let held_rev = fraction_split(&rev, 0.3, 1);
    let mut picked_rev: Vec<&str> = rev
        .iter()
        .zip(&held_rev)
        .filter(|x| *x.1)
        .map(|x| *x.0)
        .collect();
    picked_rev.reverse();
    assert_eq!(picked, picked_rev);
    // At least one row each side.
    assert_eq!(
        fraction_split(&["a", "b"], 0.01, 0),
        fraction_split(&["a", "b"], 0.01, 0)
    );
    assert_eq!(
        fraction_split(&["a", "b"], 0.99, 0)
            .iter()
            .filter(|h| **h)
            .count(),
        1
    );
    // FNV-1a by hand: offset basis, then xor/multiply per byte.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in [0u8; 8].iter().chain(b"a") {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    assert_eq!(fnv1a(0, "a"), h);
}

#[test]
fn eval_file_first_rows_and_same_file_exclusion() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", &sums_jsonl());
    let eval = write(
        dir.path(),
        "e.csv",
        "question,answer\n1+1=,2\n2+3=,5\n3+3=,6\n",
    );
    let tok = Tokenizer::builtin_arithmetic();
    let mut c = cfg(&path, "q.text", "sol", "numeric");
    c.eval_path = Some(eval.clone());
    c.prompt_field = Some("q.text".into());
    // The eval file has other field names: each file is read with the same mapping.
    let e = err(&c, &tok);
    assert!(e.contains("e.csv: line 2: missing field `q.text`"), "{e}");
    let same = TaskConfig {
        eval_path: Some(path.clone()),
        heldout_size: 5,
        ..c.clone()
    };
    let task = DatasetTask::new(&same, &tok, "m").unwrap();
    assert_eq!((task.heldout().len(), task.train_len()), (5, 15));
    assert_eq!(task.heldout()[0].prompt, "0+0=");
    assert_eq!(task.train_problems()[0].prompt, "5+5=");
    let both = TaskConfig {
        eval_fraction: Some(0.5),
        ..same
    };
    assert!(err(&both, &tok).contains("give one"));
}

#[test]
fn chat_messages_system_field_and_prompt_template() {
    let dir = tempfile::tempdir().unwrap();
    let rows = serde_json::json!([
        {"id": "r1", "messages": [{"role": "user", "content": "Capital of France?"}], "sys": "Be brief.", "gold": "B"},
        {"id": "r2", "messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "2?"}], "sys": "Be brief.", "gold": "(C)"}
    ]);
    let path = write(dir.path(), "chat.json", &rows.to_string());
    let tok = chat_gpt2();
    let mut c = cfg(&path, "messages", "gold", "choice");
    c.system_field = Some("sys".into());
    c.id_field = Some("id".into());
    c.eval_path = Some(path.clone());
    c.heldout_size = 1;
    let task = DatasetTask::new(&c, &tok, "m").unwrap();
    assert_eq!(task.style, PromptStyle::Chat);
    assert!(!task.prompt_bos());
    assert_eq!(
        task.heldout()[0].prompt,
        "<|system|>Be brief.\n<|user|>Capital of France?\n<|assistant|>"
    );
    // A row with its own system message keeps it.
    assert_eq!(
        task.train_problems()[0].prompt,
        "<|system|>Own.\n<|user|>2?\n<|assistant|>"
    );
    assert_eq!(
        task.score("", "The answer is (C).", true, "(C)")
            .unwrap()
            .score,
        1.0
    );

    // A text field through a prompt template, the row's fields in scope, then the chat template.
    let lines = [
        serde_json::json!({"question": "2+2", "meta": {"unit": "apples"}, "a": 4}),
        serde_json::json!({"question": "3+3", "meta": {"unit": "pears"}, "a": 6}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let path = write(dir.path(), "t.jsonl", &text);
    let mut c = cfg(&path, "question", "a", "numeric");
    c.prompt_template = Some("How many {{ meta.unit }}: {{ question | trim }}?".into());
    c.eval_fraction = Some(0.5);
    let task = DatasetTask::new(&c, &tok, "m").unwrap();
    let all: Vec<&str> = task
        .train_problems()
        .iter()
        .chain(task.heldout())
        .map(|p| p.prompt.as_str())
        .collect();
    assert!(
        all.contains(&"<|user|>How many apples: 2+2?\n<|assistant|>"),
        "{all:?}"
    );
    // Base style: the template's text as is; an unknown name in the template is an error.
    c.prompt_style = Some("base".into());
    let task = DatasetTask::new(&c, &tok, "m").unwrap();
    assert!(task.heldout()[0].prompt.starts_with("How many "));
    c.prompt_template = Some("{{ questoin }}".into());
    let e = err(&c, &tok);
    assert!(
        e.contains("t.jsonl: line 1: task.prompt_template") && e.contains("undefined"),
        "{e}"
    );
}

#[test]
fn bad_rows_are_errors_naming_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::builtin_arithmetic();
    let check = |name: &str, text: &str, reward: &str, want: &str| {
        let path = write(dir.path(), name, text);
        let e = err(&cfg(&path, "q", "a", reward), &tok);
        assert!(e.contains(want), "{name}: {e}");
    };
    check(
        "m.jsonl",
        "{\"q\":\"1+1=\",\"a\":\"2\"}\n{\"q\": 1+}\n",
        "exact",
        "m.jsonl: line 2: not valid JSON",
    );
    check(
        "f.jsonl",
        "{\"q\":\"1+1=\",\"a\":\"2\"}\n\n{\"q\":\"1+2=\"}\n",
        "exact",
        "f.jsonl: line 3: missing field `a`: no `a` in the row",
    );
    check(
        "n.csv",
        "q,a\n1+1=,2\n1+2=,three\n",
        "numeric",
        "n.csv: line 3: field `a`: expected a number, found \"three\"",
    );
    check(
        "c.json",
        "[{\"q\":\"1=\",\"a\":\"Paris\"},{\"q\":\"2=\",\"a\":\"Rome\"}]",
        "choice",
        ": field `a`: expected a choice letter",
    );
    check(
        "e.jsonl",
        "\n\n",
        "exact",
        "e.jsonl: no rows (expected one JSON object per line)",
    );
    check(
        "v.jsonl",
        "{\"q\":\"what is 1+1?\",\"a\":\"2\"}\n{\"q\":\"what is 2+2?\",\"a\":\"4\"}\n",
        "exact",
        ": field `q`: 'w' is not in the model's vocabulary",
    );
    check(
        "o.json",
        "[[1, 2]]",
        "exact",
        "o.json: element 1: expected an object of fields, found an array",
    );
    let msgs = "{\"q\":[{\"role\":\"user\",\"content\":\"1+1=\"}],\"a\":\"2\"}\n{\"q\":\"2+2=\",\"a\":\"4\"}\n";
    check(
        "msg.jsonl",
        msgs,
        "exact",
        "msg.jsonl: line 1: field `q` holds a message list, which needs the model's chat template",
    );
    let e = err(&cfg("data.txt", "q", "a", "exact"), &tok);
    assert!(
        e.contains("unknown dataset extension \"txt\"; known: .jsonl"),
        "{e}"
    );
    let mut dup = cfg(
        &write(
            dir.path(),
            "d.jsonl",
            "{\"q\":\"1=\",\"a\":\"1\",\"id\":5}\n{\"q\":\"2=\",\"a\":\"2\",\"id\":5}\n",
        ),
        "q",
        "a",
        "exact",
    );
    dup.id_field = Some("id".into());
    assert!(err(&dup, &tok).contains("d.jsonl: line 2: field `id`: id \"5\" was already used at "));
}

#[test]
fn config_errors_name_the_setting() {
    let base = cfg("d.jsonl", "q", "a", "exact");
    let v = |c: TaskConfig| c.validate().unwrap_err();
    assert!(v(TaskConfig {
        reward: None,
        ..base.clone()
    })
    .contains("needs a reward by name; known: math, exact"));
    assert!(v(TaskConfig {
        reward: Some("f1".into()),
        ..base.clone()
    })
    .contains("unknown reward \"f1\"; known: math, exact, choice"));
    assert!(v(TaskConfig {
        path: None,
        ..base.clone()
    })
    .contains("needs task.path"));
    assert!(v(TaskConfig {
        eval_fraction: Some(1.0),
        ..base.clone()
    })
    .contains("(0, 1), found 1"));
    assert!(v(TaskConfig {
        reward: Some("regex".into()),
        ..base.clone()
    })
    .contains("needs task.answer_regex"));
    assert!(v(TaskConfig {
        reward: Some("regex".into()),
        answer_regex: Some("x".into()),
        ..base.clone()
    })
    .contains("no capture group"));
    assert!(v(TaskConfig {
        reward: Some("external".into()),
        ..base.clone()
    })
    .contains("[task.external]"));
    assert!(v(TaskConfig {
        check: Some("math".into()),
        ..base.clone()
    })
    .contains("task.check applies to reward = \"pipeline\""));
    assert!(v(TaskConfig {
        reward: Some("pipeline".into()),
        check: Some("pipeline".into()),
        ..base.clone()
    })
    .contains("task.check"));
    assert!(v(TaskConfig {
        tolerance: Some(-1.0),
        ..base.clone()
    })
    .contains("task.tolerance"));
    assert!(v(TaskConfig {
        train_data: Some("x".into()),
        ..base.clone()
    })
    .contains("does not read task.train_data"));
    let gsm = TaskConfig {
        kind: TaskKind::Gsm8k,
        prompt_field: Some("q".into()),
        ..Default::default()
    };
    assert!(v(gsm).contains("task.kind = \"gsm8k\" does not read task.prompt_field"));
    let arith = TaskConfig {
        reward: Some("math".into()),
        ..Default::default()
    };
    assert!(v(arith).contains("\"arithmetic\" does not read task.reward"));
    let pipe = TaskConfig {
        reward: Some("pipeline".into()),
        ..base.clone()
    };
    assert_eq!(pipe.check_kind(), Ok(Some(RewardKind::Exact)));
    assert!(pipe.validate().is_ok());
    // TOML: the dataset keys are [task] keys, the external command a [task.external] table.
    let t: TaskConfig = toml::from_str(
        "kind = \"dataset\"\npath = \"d.csv\"\nreward = \"external\"\n\
         [external]\ncommand = [\"python3\", \"r.py\"]\n",
    )
    .unwrap();
    assert_eq!(t.external_command().unwrap().command, ["python3", "r.py"]);
    assert_eq!(
        toml::from_str::<TaskConfig>(&toml::to_string(&t).unwrap()).unwrap(),
        t
    );
}

/// Today's GSM8K / MATH-500 task, written out independently: the loader's rows, the fixed
/// prompt templates (and the chat template in chat style), the first `heldout_size` rows of
/// the test file held out, and the math verifier with the base-style run-on cut and the
/// cut-off rule. The presets must give the same prompts, answers and verdicts on the real files.
fn reference_verdict(base: bool, response: &str, finished: bool, reference: &str) -> Verdict {
    let (mut text, mut finished) = (response, finished);
    if base {
        if let Some(cut) = text.find("\nQuestion:") {
            text = &text[..cut];
            finished = true;
        }
    }
    let v = MathVerifier {
        last_number_fallback: finished,
        ..Default::default()
    };
    let mut out = v.verify(text, reference);
    if !finished && out.extracted.is_none() {
        out.reason = "truncated (no EOS) and no marked answer".into();
    }
    out
}

#[test]
fn presets_equal_the_loader_templates_and_verifier_on_the_real_files() {
    let cases = [
        (
            TaskKind::Gsm8k,
            DatasetKind::Gsm8k,
            gpt2(),
            PromptStyle::Base,
            200,
        ),
        (
            TaskKind::Math500,
            DatasetKind::Math500,
            chat_gpt2(),
            PromptStyle::Chat,
            100,
        ),
    ];
    for (kind, dk, tok, style, held) in cases {
        let cfg = TaskConfig {
            kind,
            heldout_size: held,
            train_data: (kind == TaskKind::Gsm8k).then(|| data("gsm8k/train.jsonl")),
            eval_data: Some(data(&format!(
                "{}/test.jsonl",
                if kind == TaskKind::Gsm8k {
                    "gsm8k"
                } else {
                    "math500"
                }
            ))),
            ..Default::default()
        };
        let task = DatasetTask::new(&cfg, &tok, "m").unwrap();
        assert_eq!(task.style, style);
        let (train_path, eval_path) = cfg.data_paths(dk);
        let eval_rows = datasets::load(dk, &eval_path).unwrap();
        let train_rows = if kind == TaskKind::Gsm8k {
            datasets::load(dk, &train_path).unwrap()
        } else {
            eval_rows[held..].to_vec()
        };
        let template = ChatTemplate::from_tokenizer(&tok, "m").transpose().unwrap();
        let prompt = |r: &datasets::MathProblem| {
            let text = datasets::render_prompt(r, style, dk);
            match &template {
                Some(t) => t.render_user(&text).unwrap(),
                None => text,
            }
        };
        let expect = |rows: &[datasets::MathProblem]| -> Vec<Problem> {
            rows.iter()
                .map(|r| Problem {
                    prompt: prompt(r),
                    answer: r.answer.clone(),
                })
                .collect()
        };
        assert_eq!(task.heldout(), expect(&eval_rows[..held]).as_slice());
        assert_eq!(task.train_problems(), expect(&train_rows).as_slice());
        let base = style == PromptStyle::Base;
        for (p, r) in task.heldout().iter().zip(&eval_rows) {
            let solution = datasets::reference_response(r, dk);
            let responses = [
                (solution.clone(), true),
                (solution, false),
                (format!(" so the answer is {}.", r.answer), false),
                (format!(" {}", r.answer), false),
                (format!(" {}", r.answer), true),
                (
                    format!(" #### {}\nQuestion: what is 5?\n#### 5", r.answer),
                    false,
                ),
                (" #### 0".to_string(), true),
            ];
            for (resp, finished) in &responses {
                assert_eq!(
                    task.score(&p.prompt, resp, *finished, &p.answer).unwrap(),
                    reference_verdict(base, resp, *finished, &r.answer),
                    "{kind:?} {resp:?} finished={finished}"
                );
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let p = task.sample_train(&mut rng);
        assert!(task.reference_response(&p.prompt, &p.answer).len() > p.answer.len());
    }
}

//! Pretrained policies in and out: the tiny GGUF file loads and generates, a saved HF folder
//! reloads with identical logits and the same tokenizer behaviour, and HF-folder special
//! tokens and chat templates are picked up.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use grove::model::io::{load_gguf, load_pretrained, save_pretrained};
use grove::model::{attention_mask, ChatTemplate, Config, Llama, Tokenizer};
use grove::rollout::{generate, SamplingParams};
use rand::SeedableRng;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel)
}

fn tiny_gguf() -> PathBuf {
    data("models/llama-tiny-random-gguf/llama-2-tiny-random.gguf")
}

/// Logits (b, t, V) of a full causal forward over `ids`.
fn logits(model: &Llama, ids: &[Vec<u32>]) -> Vec<f32> {
    let dev = Device::Cpu;
    let (b, t) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat();
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let h = model
        .forward_hidden(
            &Tensor::from_vec(flat, (b, t), &dev).unwrap(),
            &Tensor::from_vec(pos, (b, t), &dev).unwrap(),
            &attention_mask(&vec![vec![true; t]; b], 0, t, &dev).unwrap(),
            None,
        )
        .unwrap();
    model
        .logits(&h)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn tiny_gguf_loads_and_generates() {
    let (model, tok) = load_gguf(&tiny_gguf(), &Device::Cpu).unwrap();
    assert_eq!(model.cfg.vocab_size, 32000);
    assert_eq!((model.cfg.hidden_size, model.cfg.num_hidden_layers), (8, 1));
    assert!(!model.cfg.tied());
    assert_eq!((tok.bos, tok.eos), (Some(1), 2));
    // Llama-2 ids: ▁Hello = 15043, ▁world = 3186.
    let mut prompt = vec![tok.bos.unwrap()];
    prompt.extend(tok.encode("Hello world").unwrap());
    assert_eq!(prompt, vec![1, 15043, 3186]);
    let prompts = vec![prompt.clone(), vec![1, 450]];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let gens = generate(
        &model,
        &prompts,
        tok.eos,
        tok.pad,
        &SamplingParams::greedy(5),
        &mut rng,
    )
    .unwrap();
    assert_eq!(gens.len(), 2);
    for g in &gens {
        assert!(!g.tokens.is_empty() && g.tokens.len() <= 5);
        assert!(g.tokens.iter().all(|&t| t < 32000));
        assert!(g.logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0));
    }
    // Greedy decoding picks the argmax of a plain forward pass at each step.
    let mut seq = prompt;
    let v = 32000;
    for &tok_id in &gens[0].tokens {
        let l = logits(&model, &[seq.clone()]);
        let last = &l[(seq.len() - 1) * v..seq.len() * v];
        let argmax = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
        assert_eq!(tok_id as usize, argmax);
        seq.push(tok_id);
    }
    // load_pretrained recognises the file by its magic.
    let (m2, _) = load_pretrained(&tiny_gguf(), &Device::Cpu).unwrap();
    assert_eq!(
        logits(&m2, &[vec![1, 2, 3]]),
        logits(&model, &[vec![1, 2, 3]])
    );
}

#[test]
fn gguf_model_saved_as_hf_folder_reloads_identically() {
    let (model, tok) = load_gguf(&tiny_gguf(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_pretrained(&model, &tok, dir.path()).unwrap();
    let (back, tok2) = load_pretrained(dir.path(), &Device::Cpu).unwrap();
    let ids = vec![vec![1, 15043, 3186, 29991], vec![1, 450, 4996, 17354]];
    assert_eq!(logits(&back, &ids), logits(&model, &ids));
    assert_eq!((tok2.bos, tok2.eos, tok2.pad), (tok.bos, tok.eos, tok.pad));
    let text = "naïve café, 日本語 🙂";
    assert_eq!(tok2.encode(text).unwrap(), tok.encode(text).unwrap());
}

fn tiny_cfg(tied: bool, bias: bool, vocab: usize) -> Config {
    let mut c = Config::builtin_tiny(vocab);
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(2);
    c.tie_word_embeddings = Some(tied);
    c.attention_bias = Some(bias);
    c
}

#[test]
fn saved_folder_reproduces_logits_and_is_hf_shaped() {
    for (tied, bias) in [(true, false), (false, true)] {
        let tok = Tokenizer::builtin_arithmetic();
        let model = Llama::init(&tiny_cfg(tied, bias, tok.vocab_size()), 3, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_pretrained(&model, &tok, dir.path()).unwrap();
        let (back, tok2) = load_pretrained(dir.path(), &Device::Cpu).unwrap();
        let ids = vec![vec![1, 5, 9, 17, 3], vec![2, 8, 8, 0, 12]];
        assert_eq!(logits(&back, &ids), logits(&model, &ids), "tied={tied}");
        assert_eq!((tok2.bos, tok2.eos, tok2.pad), (tok.bos, tok.eos, tok.pad));

        // config.json: explicit values, no nulls, HF class name.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        let obj = cfg.as_object().unwrap();
        assert!(obj.values().all(|v| !v.is_null()), "{cfg}");
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(cfg["tie_word_embeddings"], tied);
        assert_eq!(cfg["attention_bias"], bias);
        assert_eq!(cfg["num_key_value_heads"], 2);
        assert_eq!(cfg["eos_token_id"], tok.eos);
        // Tied heads are stored once, as the embedding.
        let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let names: Vec<String> = st.names().into_iter().map(String::from).collect();
        assert_eq!(names.iter().any(|n| n == "lm_head.weight"), !tied);
        assert!(names.iter().any(|n| n == "model.embed_tokens.weight"));
        let (_, meta) = safetensors::SafeTensors::read_metadata(
            &std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        // tokenizer_config.json names the specials; the saved tokenizer.json adds BOS itself,
        // as transformers expects, while grove's own encode is unchanged.
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (&tc["bos_token"], &tc["eos_token"], &tc["pad_token"]),
            (
                &serde_json::json!("<bos>"),
                &serde_json::json!("<eos>"),
                &serde_json::json!("<pad>")
            )
        );
        assert_eq!(tc["add_bos_token"], true);
        let hf = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let with_specials = hf.encode("37+48=", true).unwrap();
        assert_eq!(with_specials.get_ids()[0], tok.bos.unwrap());
        assert_eq!(
            &with_specials.get_ids()[1..],
            tok.encode("37+48=").unwrap().as_slice()
        );
        assert_eq!(
            tok2.encode("37+48=").unwrap(),
            tok.encode("37+48=").unwrap()
        );
    }
}

#[test]
fn hf_folder_specials_and_chat_template_are_read() {
    // A Llama-shaped model over the real GPT-2 vocabulary, with a tokenizer_config.json in the
    // style of an instruct model.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        data("tokenizers/gpt2/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = tiny_cfg(true, false, 50257);
    let model = Llama::init(&cfg, 1, &Device::Cpu).unwrap();
    grove::model::io::save_hf_folder(&model, dir.path()).unwrap();
    let template = "{% for m in messages %}<|endoftext|>{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({
            "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>"},
            "bos_token": null,
            "chat_template": template,
        })
        .to_string(),
    )
    .unwrap();
    let (_, tok) = load_pretrained(dir.path(), &Device::Cpu).unwrap();
    assert_eq!((tok.eos, tok.pad, tok.bos), (50256, 50256, None));
    let t = ChatTemplate::from_tokenizer(&tok, "test").unwrap().unwrap();
    let text = t.render_user("Hi").unwrap();
    assert_eq!(text, "<|endoftext|>user: Hi\nassistant:");
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids[0], 50256);

    // An eos_token that is not in the vocabulary is named with its file.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let e = load_pretrained(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("<|im_end|>"),
        "{e}"
    );

    // Not a model at all.
    let e = load_pretrained(&dir.path().join("nope"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

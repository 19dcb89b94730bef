# PEFT + TRL on the work of `grove bench --rl-step` for the figures table of docs/performance.md
# (section bf16, written by bench/bf16.sh): GRPO steps of a random-init Qwen2.5-0.5B-shaped
# Qwen2 (hidden 896, 24 layers, 14 / 2 heads, FFN 4864, vocabulary 151936, tied) on prompts
# "a+b=" with the sum reward, `--prompts` prompts × `--group` samples, `--new-tokens` tokens at
# temperature 1, lr 1e-5, beta 0, loss dapo, AdamW, gradient clipping at 1 — TRL's defaults
# otherwise (gradient checkpointing on), 2 threads, on the CPU.
#
#   python bench/trl_figures.py --variant f32|bf16|lora-bf16|lora-q4 --tokenizer TOKENIZER.json [--shape qwen2.5-1.5b]
#
# bf16 is TRL's `bf16=True` (autocast, f32 master weights); lora-* add a PEFT LoRA adapter of
# rank --lora-rank on every projection; lora-q4 loads the base 4-bit through bitsandbytes
# (QLoRA's NF4 blocks of 64: PEFT's way to a quantized base; a GGUF Q4_0 block has 32 values).
# Prints one JSON line: median seconds per step over steps 3.., peak resident memory of the
# steps (VmHWM reset after the model is built, as grove's benchmark does), versions.
import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing from the network: bitsandbytes would otherwise look for kernels on the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ap = argparse.ArgumentParser()
ap.add_argument("--variant", required=True, choices=["f32", "bf16", "lora-bf16", "lora-q4"])
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--shape", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "qwen2.5-1.5b"])
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--prompts", type=int, default=2)
ap.add_argument("--group", type=int, default=4)
ap.add_argument("--new-tokens", type=int, default=16)
ap.add_argument("--lora-rank", type=int, default=16)
args = ap.parse_args()

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402


def peak_rss_gb():
    text = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1048576


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


tok = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer)
tok.eos_token = tok.bos_token = tok.unk_token = tok.pad_token = "<|endoftext|>"
EOS = tok.eos_token_id
torch.manual_seed(0)
random.seed(0)
# hidden, layers, heads, FFN: the shapes of `grove bench --model <shape>` (src/bench.rs).
hidden, layers, heads, ffn = {"qwen2.5-0.5b": (896, 24, 14, 4864), "qwen2.5-1.5b": (1536, 28, 12, 8960)}[args.shape]
cfg = Qwen2Config(vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=2, intermediate_size=ffn, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                  bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS, torch_dtype="float32")
model = Qwen2ForCausalLM(cfg).float()
peft_config = None
versions = dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl.__version__)
if args.variant.startswith("lora"):
    import peft

    versions["peft"] = peft.__version__
    peft_config = peft.LoraConfig(r=args.lora_rank, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
if args.variant == "lora-q4":
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    versions["bitsandbytes"] = bitsandbytes.__version__
    # bitsandbytes quantizes while loading: save the random model, load it back in 4 bits.
    tmp = tempfile.mkdtemp(prefix="trl-figures-")
    model.save_pretrained(tmp)
    del model
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen2ForCausalLM.from_pretrained(tmp, quantization_config=q, device_map="cpu")
    model = peft.prepare_model_for_kbit_training(model)
model.generation_config.eos_token_id = model.generation_config.pad_token_id = EOS
model.generation_config.bos_token_id = EOS

rng = random.Random(0)
rows = []
for _ in range(256):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})


def sum_reward(prompts, completions, answer, **kw):
    return [1.0 if c.strip().startswith(ans) else 0.0 for c, ans in zip(completions, answer)]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_begin(self, a, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, a, state, control, **kw):
        self.steps.append(time.perf_counter() - self.t0)


gcfg = GRPOConfig(
    output_dir=tempfile.mkdtemp(prefix="trl-figures-out-"), num_generations=args.group,
    per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
    max_completion_length=args.new_tokens, temperature=1.0, learning_rate=1e-5, beta=0.0,
    use_vllm=False, bf16=args.variant != "f32", use_cpu=True, logging_steps=1, max_steps=args.steps,
    report_to="none", save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
    max_grad_norm=1.0,
)
timer = StepTimer()
trainer = GRPOTrainer(model=model, reward_funcs=sum_reward, args=gcfg, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[timer], peft_config=peft_config)
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
reset_peak_rss()
trainer.train()
timed = timer.steps[2:] or timer.steps
print(json.dumps(dict(variant=args.variant, shape=args.shape, step_s=statistics.median(timed), steps=timer.steps,
                      steps_timed=len(timed), peak_rss_gb=peak_rss_gb(), trainable_params=trainable,
                      threads=torch.get_num_threads(), prompts=args.prompts, group=args.group,
                      new_tokens=args.new_tokens, versions=versions, python=sys.version.split()[0])))

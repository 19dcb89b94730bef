# PyTorch anchors for the targets that ../shared/bench/run_all.sh does not measure: the
# training step on the spike config and on Qwen2.5-0.5B shapes, and HF `generate` on
# Qwen2.5-0.5B shapes. The work mirrors `grove bench` exactly: random weights, a batch of
# B sequences of T tokens whose first T/2 are the prompt; log-probs of the last T/2 tokens
# only reach the output layer (what an RL trainer needs), mean log-prob as the loss, backward,
# fused AdamW. Eager PyTorch (no compile), SDPA attention, fp32, 2 threads.
#
#   OMP_NUM_THREADS=2 $VENV/bin/python bench/torch_anchors.py train --shape spike
#   OMP_NUM_THREADS=2 $VENV/bin/python bench/torch_anchors.py train --shape qwen2.5-0.5b --batch 2 --seq 128
#   OMP_NUM_THREADS=2 $VENV/bin/python bench/torch_anchors.py generate --shape qwen2.5-0.5b --batch 8 --new 32
#
# Prints one JSON line. Peak memory is the process's ru_maxrss, so run one measurement per
# process (compare.sh does). `--device cuda` runs the same work on the first GPU (timings after
# torch.cuda.synchronize(), peak memory from torch.cuda.max_memory_allocated()); that is how the
# GPU figures of docs/performance.md were taken beside `grove bench` built with --features cuda.
import argparse, json, os, resource, statistics, time

os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHAPES = {
    "spike": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=704, max_position_embeddings=512),
    "anchor": dict(vocab_size=50257, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=704, max_position_embeddings=512),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
                         rope_theta=1000000.0),
}

ap = argparse.ArgumentParser()
ap.add_argument("what", choices=["train", "generate"])
ap.add_argument("--shape", default="spike", choices=sorted(SHAPES))
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--new", type=int, default=32)
ap.add_argument("--prompt", type=int, default=8)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
args = ap.parse_args()
dev = torch.device(args.device)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()

torch.manual_seed(0)
cfg = Qwen2Config(tie_word_embeddings=True, torch_dtype="float32", **SHAPES[args.shape])
cfg._attn_implementation = "sdpa"
model = Qwen2ForCausalLM(cfg).float().to(dev)
params = sum(p.numel() for p in model.parameters())
V = cfg.vocab_size


def peak_gb():
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1048576.0


out = dict(anchor="pytorch", what=args.what, shape=args.shape, params=params, threads=torch.get_num_threads(),
           torch=torch.__version__, device=args.device)
if args.what == "train":
    B, T = args.batch, args.seq
    half = T // 2
    ids = torch.randint(0, V, (B, T)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    model.train()
    times, fwd, bwd = [], [], []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        hidden = model.model(input_ids=ids).last_hidden_state          # (B, T, H)
        h = hidden[:, half - 1:T - 1]                                   # positions predicting the response
        logits = model.lm_head(h)                                       # (B, T/2, V)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, half:].unsqueeze(-1)).squeeze(-1)
        loss = -lp.mean()
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step(); opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        times.append(t3 - t0); fwd.append(t1 - t0); bwd.append(t2 - t1)
    out.update(batch=B, seq=T, step_s=min(times[1:]), forward_s=min(fwd[1:]), backward_s=min(bwd[1:]),
               step_s_median=statistics.median(times[1:]), tokens_per_s=B * T / min(times[1:]))
else:
    B = args.batch
    ids = torch.randint(0, V - 1, (B, args.prompt)).to(dev)
    gc = GenerationConfig(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True, temperature=1.0,
                          top_p=1.0, top_k=0, pad_token_id=V - 1, eos_token_id=V - 1,
                          cache_implementation=None, disable_compile=True)
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            sync()
            times.append(time.perf_counter() - t0)
    best = min(times[1:])
    out.update(batch=B, new_tokens=args.new, sample_s=best, sample_tokens_per_s=B * args.new / best)
out["peak_rss_gb"] = peak_gb()
print(json.dumps(out))

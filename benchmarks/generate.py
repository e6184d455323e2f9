"""Answers/s and tokens/s of DiffVQA generation: the card's naive loop vs. generate() (dynamic cache) vs. a
static cache + torch.compile, at the real size (vis_dim 768, N = 256 patches per image, 64 new tokens).

    python benchmarks/generate.py                                   # CPU, fp32
    python benchmarks/generate.py --dtype bfloat16                  # CPU, bf16 weights (`dtype=torch.bfloat16`)
    python benchmarks/generate.py --device cuda --dtype bfloat16    # GPU, bf16 + SDPA

Weights are random (upstream layout); every mode generates exactly --new-tokens tokens per sample: the eos id is
one past the vocabulary, so the stopping check runs at every step but never fires.

`ms / step` is a decode step alone: (a call's time - a one-token call's time) / (new tokens - 1), which leaves the
prefill (visual projection, cross-attention keys/values, the prompt; its own column) out. Its floor is the bytes a
cached step must read (every decoder weight but the cross-attention key/value projections, `lm_head`, the cached
cross- and self-attention keys/values) divided by the device's read bandwidth, measured with a float32 `sum()`
over 1 GiB (a dtype-independent reading: a bf16 `sum()` converts as it reads and reports less) next to every timed
call, since other work on a shared machine moves it. Each figure is the median over --repeats interleaved
readings, and `x floor` their ratio.

`fixed ms` (dynamic mode) is what a step costs beyond moving bytes: the same decode step of a twin model with the
same layers, heads, vocabulary and sequence lengths but a hidden size of 32, less that twin's own floor. Every
operation is still dispatched (Python, module calls, kernel launch and set-up) while its data is negligible, so
`floor + fixed` is about the best a step run operation by operation can reach; `x (floor + fixed)` is the step's
ratio to it. `--profile` prints where a decode step's time goes, by operator, for the model and for its twin
(torch.profiler; a 64-token call less a one-token call, per step).
"""

import argparse
import json
import platform
import statistics
from datetime import date

import torch
from lapvqa_hf.convert.diffvqa import convert_state_dict
from lapvqa_hf.convert.original import DiffVQAHead, randomize_
from timing import time_calls
from transformers.generation import CompileConfig

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel
from lapvqa_hf.models.greedy_decoding import greedy_generate

NEVER = 50257  # an eos id past the vocabulary: every mode checks for it and runs the full length


def build_models(vis_dim: int, device: str, dtype: torch.dtype, attn_implementation: str):
    original = randomize_(DiffVQAHead(vis_dim=vis_dim), seed=0, std=0.02).eval()
    config = LapvqaDiffVQAConfig(vis_dim=vis_dim)
    model = LapvqaDiffVQAModel(config)
    model.load_state_dict(convert_state_dict(original.state_dict(), config))
    model.set_attn_implementation(attn_implementation)
    return original.to(device, dtype), model.to(device, dtype).eval()


def read_bandwidth(data: torch.Tensor) -> float:
    """Bytes per second that `data.sum()` reads (median of 3), `data` being far larger than the caches."""
    return data.numel() * data.element_size() / statistics.median(time_calls(data.sum, str(data.device), 3))


def time_decoding(prefill, full, probe: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median seconds of `prefill()` (one new token) and `full()`, and median read bandwidth, over `repeats` rounds
    that take one reading of each in turn (after one warm-up call of each, which also compiles)."""
    device = str(probe.device)
    prefill(), full()
    prefills, fulls, bandwidths = [], [], []
    for _ in range(repeats):
        prefills += time_calls(prefill, device, 1, warm_up=False)
        fulls += time_calls(full, device, 1, warm_up=False)
        bandwidths.append(read_bandwidth(probe))
    return statistics.median(prefills), statistics.median(fulls), statistics.median(bandwidths)


def decode_step_ms(prefill_seconds: float, full_seconds: float, new_tokens: int) -> float:
    """A decode step alone: (a `new_tokens` call - a one-token call) / (new_tokens - 1), in ms."""
    return 1e3 * (full_seconds - prefill_seconds) / (new_tokens - 1)


def tiny_twin(model: LapvqaDiffVQAModel) -> LapvqaDiffVQAModel:
    """`model` at a hidden size of 32: same layers, heads, vocabulary, positions and dtype, negligible data."""
    config = model.config
    twin = LapvqaDiffVQAModel(
        LapvqaDiffVQAConfig(
            vis_dim=32,
            hidden_size=32,
            intermediate_size=128,
            num_attention_heads=config.num_attention_heads,
            num_hidden_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
        )
    )
    twin.set_attn_implementation(model.config._attn_implementation)
    parameter = next(model.parameters())
    return twin.to(parameter.device, parameter.dtype).eval()


def profile_decode_step(run, new_tokens: int, top: int = 12) -> None:
    """Prints the operators taking the most self time per decode step: a `new_tokens` call less a one-token call."""
    from torch.profiler import ProfilerActivity, profile

    def self_times(tokens: int) -> tuple[dict[str, float], float]:
        run(tokens)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(tokens)
        events = prof.key_averages()
        return {e.key: e.self_cpu_time_total for e in events}, sum(e.self_cpu_time_total for e in events)

    (full, full_total), (one, one_total) = self_times(new_tokens), self_times(1)
    steps = new_tokens - 1
    per_step = {name: (full[name] - one.get(name, 0.0)) / steps for name in full}
    print(f"#   per decode step, profiled: operators {((full_total - one_total) / steps) / 1e3:.2f} ms in all")
    for name, micros in sorted(per_step.items(), key=lambda item: -item[1])[:top]:
        print(f"#     {micros / 1e3:7.3f} ms  {name}")


def frozen(run, new_tokens: int):
    """`run(new_tokens)` compiled with inductor's freezing: weights become constants, packed for oneDNN as
    `LapvqaLinear` packs them in eager mode (which compiled code does not take)."""
    import torch._inductor.config

    with torch._inductor.config.patch(freezing=True):
        return run(new_tokens)


def decode_step_bytes(model: LapvqaDiffVQAModel, batch: int, memory_tokens: int, text_tokens: int) -> int:
    """What one cached decode step must read: weights (cross-attention k/v projections excluded: their outputs are
    cached), one `lm_head` pass, and the cached keys/values of every layer."""
    config, size = model.config, next(model.parameters()).element_size()
    skipped = (
        "visual_projection",
        "frame_embeddings",
        "embed_tokens",
        "embed_positions",
        "encoder_attn.k_proj",
        "encoder_attn.v_proj",
    )
    weights = sum(p.numel() for name, p in model.named_parameters() if not any(s in name for s in skipped))
    cached = 2 * config.num_hidden_layers * batch * (memory_tokens + text_tokens) * config.hidden_size
    return (weights + cached) * size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--modes",
        default="naive,dynamic,static-compiled",
        help="comma-separated, of naive, dynamic, static-compiled, static-compiled-frozen (inductor's freezing), "
        "fast-greedy (lapvqa_hf.models.greedy_decoding: the step on the device, static cache, no compile)",
    )
    parser.add_argument("--vis-dim", type=int, default=768)
    parser.add_argument("--patches", type=int, default=256, help="patch tokens per image")
    parser.add_argument("--prompt-tokens", type=int, default=12, help="question tokens + bos")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="print each dynamic row's costliest operators")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    original, model = build_models(args.vis_dim, args.device, dtype, args.attn_implementation)
    model.generation_config.eos_token_id = NEVER  # fast-greedy reads it there; generate() is given it
    twin = tiny_twin(model)
    compile_config = CompileConfig(
        fullgraph=True, mode="reduce-overhead" if args.device.startswith("cuda") else "default"
    )
    compile_config._compile_all_devices = True
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads"
    )
    probe = torch.ones(2**28, device=args.device)  # 1 GiB of float32 for the bandwidth readings
    print(
        f"# {date.today()}  device: {device_name}  dtype: {args.dtype}  attention: {args.attn_implementation}"
        f"  torch {torch.__version__}"
    )
    print(
        "| batch | mode | s / batch | answers/s | tokens/s | speed-up vs naive | prefill ms | ms / step | GB/s "
        "| floor ms | x floor | fixed ms | x (floor + fixed) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        curr_vis = torch.randn(batch, args.patches, args.vis_dim, device=args.device, dtype=dtype)
        ref_vis = torch.randn(batch, args.patches, args.vis_dim, device=args.device, dtype=dtype)
        question = torch.randint(0, 50256, (batch, args.prompt_tokens - 1), device=args.device)
        prompt = torch.cat([question, torch.full((batch, 1), 50256, device=args.device)], dim=1)
        common = dict(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            current_image_features=curr_vis,
            prior_image_features=ref_vis,
            eos_token_id=NEVER,
            do_sample=False,
        )
        twin_inputs = dict(
            current_image_features=curr_vis[..., :32].contiguous(), prior_image_features=ref_vis[..., :32].contiguous()
        )
        runs = {
            "naive": lambda new_tokens: original.generate(curr_vis, ref_vis, question, 50256, NEVER, new_tokens),
            "dynamic": lambda new_tokens: model.generate(**common, max_new_tokens=new_tokens),
            "twin": lambda new_tokens: twin.generate(**{**common, **twin_inputs}, max_new_tokens=new_tokens),
            "static-compiled": lambda new_tokens: model.generate(
                **common, max_new_tokens=new_tokens, cache_implementation="static", compile_config=compile_config
            ),
            "static-compiled-frozen": lambda new_tokens: frozen(runs["static-compiled"], new_tokens),
            "fast-greedy": lambda new_tokens: greedy_generate(
                model,
                prompt,
                torch.ones_like(prompt),
                new_tokens,
                current_image_features=curr_vis,
                prior_image_features=ref_vis,
            ),
        }
        naive_seconds = None
        text_tokens = args.prompt_tokens + args.new_tokens // 2  # the self-attention cache's mean length
        step_bytes = decode_step_bytes(model, batch, 2 * args.patches, text_tokens)
        twin_step_bytes = decode_step_bytes(twin, batch, 2 * args.patches, text_tokens)
        for mode in args.modes.split(","):
            run = runs[mode]
            if mode == "static-compiled-frozen":
                torch._dynamo.reset()  # compile anew, under inductor's freezing, not reusing the unfrozen graphs
            try:
                with torch.inference_mode():
                    prefill, seconds, bandwidth = time_decoding(
                        lambda: run(1), lambda: run(args.new_tokens), probe, args.repeats
                    )
            except Exception as error:  # one failing mode (e.g. a compile error) must not lose the other rows
                print(f"| {batch} | {mode} | failed: {type(error).__name__}: {str(error).splitlines()[0][:200]} |")
                continue
            naive_seconds = seconds if mode == "naive" else naive_seconds
            speedup = f"{naive_seconds / seconds:.1f}x" if naive_seconds else "-"
            step_ms = decode_step_ms(prefill, seconds, args.new_tokens)
            floor_ms = 1e3 * step_bytes / bandwidth
            fixed_ms = None
            if mode == "dynamic":
                with torch.inference_mode():
                    twin_prefill, twin_seconds, twin_bandwidth = time_decoding(
                        lambda: runs["twin"](1), lambda: runs["twin"](args.new_tokens), probe, args.repeats
                    )
                twin_step_ms = decode_step_ms(twin_prefill, twin_seconds, args.new_tokens)
                fixed_ms = twin_step_ms - 1e3 * twin_step_bytes / twin_bandwidth
            row = dict(
                batch=batch,
                mode=mode,
                seconds=seconds,
                answers_per_s=batch / seconds,
                tokens_per_s=batch * args.new_tokens / seconds,
                prefill_ms=1e3 * prefill,
                step_ms=step_ms,
                read_bandwidth_gb_s=bandwidth / 1e9,
                floor_ms=floor_ms,
                fixed_ms=fixed_ms,
            )
            results.append(row)
            print(
                f"| {batch} | {mode} | {seconds:.3f} | {row['answers_per_s']:.1f} | {row['tokens_per_s']:.0f} | {speedup} "
                f"| {row['prefill_ms']:.1f} | {step_ms:.2f} | {bandwidth / 1e9:.1f} | {floor_ms:.2f} "
                f"| {step_ms / floor_ms:.1f}x "
                + (
                    f"| {fixed_ms:.2f} | {step_ms / (floor_ms + fixed_ms):.1f}x |"
                    if fixed_ms is not None
                    else "| - | - |"
                ),
                flush=True,
            )
            if args.profile and mode == "dynamic":
                with torch.inference_mode():
                    print("#   the model:")
                    profile_decode_step(run, args.new_tokens)
                    print("#   its hidden-size-32 twin (the fixed cost):")
                    profile_decode_step(runs["twin"], args.new_tokens)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {"device": device_name, "dtype": args.dtype, "args": vars(args), "results": results}, file, indent=1
            )


if __name__ == "__main__":
    main()
